// text.c: text in and out of the command line (text.h).
#include "text.h"

#include "common.h"

#include <errno.h>
#include <string.h>

int text_parse_format(const char *s, enum text_format *out) {
    static const char *const names[] = {"text", "ids", "jsonl"};
    for (int i = 0; i < 3; i++)
        if (strcmp(s, names[i]) == 0) {
            *out = (enum text_format)i;
            return 0;
        }
    return -1;
}

int text_open(struct text_codec *tc, const char *path, bool encode, char *err, size_t errlen) {
    memset(tc, 0, sizeof *tc);
    int st = tokenizer_load(&tc->tk, path, err, errlen);
    if (!st && encode) {
        st = bpe_create(&tc->bpe, &tc->tk, path, err, errlen);
        if (st) tokenizer_free(&tc->tk);
        tc->can_encode = st == 0;
    }
    return st;
}

void text_close(struct text_codec *tc) {
    if (tc->can_encode) bpe_free(&tc->bpe);
    tokenizer_free(&tc->tk);
    memset(tc, 0, sizeof *tc);
}

int text_encode_prompt(const struct text_codec *tc, const char *text, int vocab_size, int **ids, int *n,
                       char *err, size_t errlen) {
    *ids = NULL;
    *n = 0;
    size_t len = strlen(text);
    if (len == 0)
        return tp_errf(err, errlen, "--prompt: the text is empty; give some text, or leave --prompt out to start "
                       "from end-of-text");
    if (len > TEXT_MAX_PROMPT_BYTES)
        return tp_errf(err, errlen, "--prompt: %zu bytes, more than the %d a prompt may have; put the token ids in "
                       "a file for --prompt-tokens (tptrain --encode FILE writes them)", len, TEXT_MAX_PROMPT_BYTES);
    int *v;
    size_t m = bpe_encode(&tc->bpe, text, len, &v);
    for (size_t i = 0; i < m; i++)
        if (v[i] >= vocab_size) {
            int bad = v[i];
            free(v);
            return tp_errf(err, errlen, "--prompt: token %zu of the text is id %d, outside the model's vocabulary "
                           "[0, %d); this model was not trained on GPT-2's tokens, so give --prompt-tokens FILE",
                           i + 1, bad, vocab_size);
        }
    *ids = v;
    *n = (int)m; // m <= len <= 2^20
    return 0;
}

char *text_decode(const struct tokenizer *tk, const int *ids, size_t n, size_t *len) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) total += ids[i] >= 0 && ids[i] < tk->vocab_size ? tk->lengths[ids[i]] : 0;
    char *out = tp_malloc(total + 1);
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= tk->vocab_size) continue; // a larger model's ids print as nothing
        memcpy(out + used, tk->pieces[ids[i]], tk->lengths[ids[i]]);
        used += tk->lengths[ids[i]];
    }
    out[used] = '\0';
    *len = used;
    return out;
}

json_t *text_json_string(const char *bytes, size_t n) {
    const unsigned char *s = (const unsigned char *)bytes;
    char *clean = tp_malloc(3 * n + 1); // U+FFFD is 3 bytes
    size_t used = 0;
    for (size_t i = 0; i < n;) {
        size_t len = bpe_utf8_char(s + i, n - i);
        if (len == 0) {
            memcpy(clean + used, "\xEF\xBF\xBD", 3);
            used += 3;
            i++;
        } else {
            memcpy(clean + used, s + i, len);
            used += len;
            i += len;
        }
    }
    json_t *j = json_stringn(clean, used);
    free(clean);
    if (!j) tp_die(TP_EXIT_RUNTIME, "out of host memory building a JSON string of %zu bytes", used);
    return j;
}

json_t *text_json_ids(const int *ids, size_t n) {
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++) json_array_append_new(a, json_integer(ids[i]));
    return a;
}

// ---- --encode FILE

// Reads all of f (at most TEXT_MAX_ENCODE_BYTES). Returns 0 or TP_EXIT_USAGE with err set.
static int read_all(FILE *f, const char *name, char **out, size_t *n, char *err, size_t errlen) {
    size_t cap = 1 << 16, used = 0;
    char *buf = tp_malloc(cap);
    for (;;) {
        if (used == cap) {
            if (cap > TEXT_MAX_ENCODE_BYTES) {
                free(buf);
                return tp_errf(err, errlen, "--encode %s: more than %zu bytes; for a corpus, make token shards with "
                               "scripts/prepare_data.py", name, TEXT_MAX_ENCODE_BYTES);
            }
            char *grown = realloc(buf, cap *= 2);
            if (!grown) tp_die(TP_EXIT_RUNTIME, "out of host memory reading %s", name);
            buf = grown;
        }
        size_t got = fread(buf + used, 1, cap - used, f);
        used += got;
        if (got == 0) break;
    }
    if (ferror(f)) {
        free(buf);
        return tp_errf(err, errlen, "--encode %s: read failed: %s", name, strerror(errno));
    }
    if (used > TEXT_MAX_ENCODE_BYTES) {
        free(buf);
        return tp_errf(err, errlen, "--encode %s: more than %zu bytes; for a corpus, make token shards with "
                       "scripts/prepare_data.py", name, TEXT_MAX_ENCODE_BYTES);
    }
    *out = buf;
    *n = used;
    return 0;
}

int text_encode_file(const char *path, const char *tokenizer_path, enum text_format format) {
    char err[2048] = "";
    bool from_stdin = strcmp(path, "-") == 0;
    FILE *f = from_stdin ? stdin : fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "tptrain: --encode %s: cannot open: %s\n", path, strerror(errno));
        return TP_EXIT_USAGE;
    }
    char *text = NULL;
    size_t n = 0;
    int st = read_all(f, path, &text, &n, err, sizeof err);
    if (!from_stdin) fclose(f);
    struct text_codec tc;
    if (!st) st = text_open(&tc, tokenizer_path, true, err, sizeof err);
    if (st) {
        fprintf(stderr, "tptrain: %s\n", err);
        free(text);
        return st;
    }
    int *ids;
    size_t m = bpe_encode(&tc.bpe, text, n, &ids);
    if (format == TEXT_FORMAT_JSONL) {
        json_t *o = json_object();
        json_object_set_new(o, "file", text_json_string(path, strlen(path)));
        json_object_set_new(o, "bytes", json_integer((json_int_t)n));
        json_object_set_new(o, "ids", text_json_ids(ids, m));
        json_dumpf(o, stdout, JSON_COMPACT);
        putchar('\n');
        json_decref(o);
    } else {
        for (size_t i = 0; i < m; i++) printf(i + 1 < m && (i + 1) % 20 ? "%d " : "%d\n", ids[i]);
    }
    free(ids);
    free(text);
    text_close(&tc);
    return TP_EXIT_OK;
}
