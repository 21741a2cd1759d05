// bpe.c: GPT-2's byte-level BPE encoder (bpe.h): UTF-8 checks, the pre-tokenising pattern by hand,
// merges through a hash table of token pairs and a heap, and tiktoken's rule for invalid bytes.
#include "bpe.h"

#include "common.h"

#include <stdbool.h>
#include <string.h>

#define BPE_NO_RANK (-1)

struct bpe_slot {
    uint32_t left, right;
    int32_t rank;   // the merge's index; BPE_NO_RANK marks an empty slot
    int32_t result; // the token the merge makes
};

// ---- Unicode classes and UTF-8

enum bpe_class bpe_unicode_class(uint32_t cp) {
    if (cp < 128) return (enum bpe_class)bpe_unicode_ascii[cp];
    int lo = 0, hi = bpe_unicode_n_ranges - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        if (cp < bpe_unicode_ranges[mid].first) hi = mid - 1;
        else if (cp > bpe_unicode_ranges[mid].last) lo = mid + 1;
        else return (enum bpe_class)bpe_unicode_ranges[mid].cls;
    }
    return BPE_OTHER;
}

static bool is_cont(unsigned char c) { return (c & 0xC0) == 0x80; }

size_t bpe_utf8_char(const unsigned char *s, size_t n) {
    if (n == 0) return 0;
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    if (c < 0xC2) return 0; // a continuation byte, or the lead of an overlong 2-byte form
    if (c < 0xE0) return n >= 2 && is_cont(s[1]) ? 2 : 0;
    if (c < 0xF0) {
        // E0 would be overlong below A0; ED above 9F would be a surrogate
        unsigned char lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
        return n >= 3 && s[1] >= lo && s[1] <= hi && is_cont(s[2]) ? 3 : 0;
    }
    if (c < 0xF5) {
        // F0 would be overlong below 90; F4 above 8F would pass U+10FFFF
        unsigned char lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
        return n >= 4 && s[1] >= lo && s[1] <= hi && is_cont(s[2]) && is_cont(s[3]) ? 4 : 0;
    }
    return 0;
}

size_t bpe_utf8_valid(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) { // ASCII runs are the common case
            i++;
            continue;
        }
        size_t len = bpe_utf8_char(s + i, n - i);
        if (len == 0) break;
        i += len;
    }
    return i;
}

// The class of the character at s[i] (in well-formed s[0, n)) and its length in bytes.
static enum bpe_class class_at(const unsigned char *s, size_t n, size_t i, size_t *len) {
    unsigned char c = s[i];
    if (c < 0x80) {
        *len = 1;
        return (enum bpe_class)bpe_unicode_ascii[c];
    }
    size_t l = bpe_utf8_char(s + i, n - i);
    if (l == 0) { // not reached for well-formed input; a lone byte is a symbol
        *len = 1;
        return BPE_OTHER;
    }
    uint32_t cp = l == 2 ? (uint32_t)(c & 0x1F) : l == 3 ? (uint32_t)(c & 0x0F) : (uint32_t)(c & 0x07);
    for (size_t k = 1; k < l; k++) cp = cp << 6 | (uint32_t)(s[i + k] & 0x3F);
    *len = l;
    return bpe_unicode_class(cp);
}

// ---- the pre-tokeniser

// End of the run of characters of class cls that starts at i.
static size_t run_end(const unsigned char *s, size_t n, size_t i, enum bpe_class cls) {
    size_t len;
    while (i < n && class_at(s, n, i, &len) == cls) i += len;
    return i;
}

// The pattern's alternatives are tried in order at pos, and the first that matches wins.
size_t bpe_piece_end(const unsigned char *s, size_t n, size_t pos) {
    // 's|'t|'re|'ve|'m|'ll|'d  (ASCII lower case only, as the pattern is written)
    if (s[pos] == '\'' && pos + 1 < n) {
        unsigned char a = s[pos + 1], b = pos + 2 < n ? s[pos + 2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return pos + 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return pos + 3;
    }
    //  ?\p{L}+ |  ?\p{N}+ |  ?[^\s\p{L}\p{N}]+ : a space joins the run that follows it
    size_t len;
    enum bpe_class cls = class_at(s, n, pos, &len);
    if (s[pos] == ' ' && pos + 1 < n) {
        enum bpe_class next = class_at(s, n, pos + 1, &len);
        if (next != BPE_SPACE) return run_end(s, n, pos + 1, next);
    }
    if (cls != BPE_SPACE) return run_end(s, n, pos, cls);
    // \s+(?!\S) | \s+ : a run of white space, less its last character when something follows it,
    // so that character can join the next word (a lone one is matched by \s+ all the same)
    size_t last = pos, end = pos;
    while (end < n && class_at(s, n, end, &len) == BPE_SPACE) {
        last = end;
        end += len;
    }
    return end == n || last == pos ? end : last;
}

// ---- merges

static const struct bpe_slot *find_pair(const struct bpe *bpe, uint32_t left, uint32_t right) {
    size_t i = (size_t)tp_splitmix64((uint64_t)left << 32 | right) & bpe->mask;
    for (;;) {
        const struct bpe_slot *s = &bpe->slots[i];
        if (s->rank == BPE_NO_RANK) return NULL;
        if (s->left == left && s->right == right) return s;
        i = (i + 1) & bpe->mask;
    }
}

// Scratch space for merging one piece, grown as pieces need and reused across them.
struct bpe_work {
    size_t cap;
    int *tok;       // (cap) the token of the part that starts at each byte
    uint32_t *next; // (cap) where the next part starts
    uint32_t *prev; // (cap) where the previous part starts
    int32_t *rank;  // (cap) rank of the pair (this part, next part); BPE_NO_RANK: none, or no part here
    uint64_t *heap; // (3 * cap) rank << 32 | start of the pair, smallest first
    size_t n_heap;
};

static void work_reserve(struct bpe_work *w, size_t n) {
    if (n <= w->cap) return;
    size_t cap = n < 64 ? 64 : n;
    free(w->tok);
    free(w->next);
    free(w->prev);
    free(w->rank);
    free(w->heap);
    w->tok = tp_malloc(cap * sizeof *w->tok);
    w->next = tp_malloc(cap * sizeof *w->next);
    w->prev = tp_malloc(cap * sizeof *w->prev);
    w->rank = tp_malloc(cap * sizeof *w->rank);
    w->heap = tp_malloc(3 * cap * sizeof *w->heap); // n - 1 pairs at the start, at most 2 more per merge
    w->cap = cap;
}

static void work_free(struct bpe_work *w) {
    free(w->tok);
    free(w->next);
    free(w->prev);
    free(w->rank);
    free(w->heap);
    memset(w, 0, sizeof *w);
}

static void heap_push(struct bpe_work *w, uint64_t key) {
    size_t i = w->n_heap++;
    while (i > 0 && w->heap[(i - 1) / 2] > key) {
        w->heap[i] = w->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    w->heap[i] = key;
}

static uint64_t heap_pop(struct bpe_work *w) {
    uint64_t top = w->heap[0], key = w->heap[--w->n_heap];
    size_t i = 0, n = w->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && w->heap[c + 1] < w->heap[c]) c++;
        if (w->heap[c] >= key) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n > 0) w->heap[i] = key;
    return top;
}

// Looks up the pair that starts at part p and records its rank (pushing it) or its absence.
static void rank_pair(const struct bpe *bpe, struct bpe_work *w, uint32_t p, size_t n) {
    w->rank[p] = BPE_NO_RANK;
    uint32_t q = w->next[p];
    if (q >= n) return;
    const struct bpe_slot *s = find_pair(bpe, (uint32_t)w->tok[p], (uint32_t)w->tok[q]);
    if (!s) return;
    w->rank[p] = s->rank;
    heap_push(w, (uint64_t)(uint32_t)s->rank << 32 | p);
}

// Merges the lowest-ranked adjacent pair (the leftmost among equal ranks, since a heap key is
// (rank, start)) until no pair is a merge. A popped entry is stale when its part has merged since:
// the pair's rank is then another one (a part's bytes only grow, so a pair never comes back).
static size_t merge_piece(const struct bpe *bpe, struct bpe_work *w, const unsigned char *piece, size_t n,
                          int *out) {
    if (n == 1) {
        out[0] = bpe->byte_token[piece[0]];
        return 1;
    }
    work_reserve(w, n);
    w->n_heap = 0;
    for (size_t i = 0; i < n; i++) {
        w->tok[i] = bpe->byte_token[piece[i]];
        w->next[i] = (uint32_t)(i + 1);
        w->prev[i] = (uint32_t)i - 1; // wraps for i = 0; never read there
    }
    for (size_t i = 0; i + 1 < n; i++) rank_pair(bpe, w, (uint32_t)i, n);
    while (w->n_heap > 0) {
        uint64_t key = heap_pop(w);
        uint32_t p = (uint32_t)key;
        if (w->rank[p] != (int32_t)(key >> 32)) continue;
        uint32_t q = w->next[p];
        const struct bpe_slot *s = find_pair(bpe, (uint32_t)w->tok[p], (uint32_t)w->tok[q]);
        w->tok[p] = s->result;
        w->rank[q] = BPE_NO_RANK; // q is no longer a part
        w->next[p] = w->next[q];
        if (w->next[p] < n) w->prev[w->next[p]] = p;
        rank_pair(bpe, w, p, n);
        if (p > 0) rank_pair(bpe, w, w->prev[p], n);
    }
    size_t count = 0;
    for (size_t p = 0; p < n; p = w->next[p]) out[count++] = w->tok[p];
    return count;
}

size_t bpe_merge_piece(const struct bpe *bpe, const unsigned char *piece, size_t n, int *out) {
    if (n == 0) return 0;
    struct bpe_work w = {0};
    size_t count = merge_piece(bpe, &w, piece, n, out);
    work_free(&w);
    return count;
}

// ---- encoding

struct id_list {
    int *v;
    size_t n, cap;
};

static void encode_piece(const struct bpe *bpe, struct bpe_work *w, const unsigned char *piece, size_t n,
                         struct id_list *out) {
    if (out->n + n > out->cap) {
        size_t cap = 2 * out->cap > out->n + n ? 2 * out->cap : out->n + n + 1024;
        int *v = realloc(out->v, cap * sizeof *v);
        if (!v) tp_die(TP_EXIT_RUNTIME, "out of host memory encoding %zu bytes of text", n);
        out->v = v;
        out->cap = cap;
    }
    out->n += merge_piece(bpe, w, piece, n, out->v + out->n);
}

static bool all_space(const struct tokenizer *tk, int token) {
    for (size_t i = 0; i < tk->lengths[token]; i++) {
        char c = tk->pieces[token][i];
        if (c != ' ' && c != '\n' && c != '\t') return false;
    }
    return true;
}

// tiktoken's rule for bytes that are not UTF-8: the tokens of the last piece before them
// (from `first`, widened back over white-space tokens), their bytes and every byte from s[valid]
// on are encoded again as one piece.
static void encode_tail(const struct bpe *bpe, struct bpe_work *w, const unsigned char *s, size_t n, size_t valid,
                        size_t first, struct id_list *out) {
    const struct tokenizer *tk = bpe->tk;
    size_t k = first;
    if (k < out->n && all_space(tk, out->v[k]))
        while (k > 0 && all_space(tk, out->v[k - 1])) k--;
    size_t len = n - valid;
    for (size_t i = k; i < out->n; i++) len += tk->lengths[out->v[i]];
    unsigned char *tail = tp_malloc(len);
    size_t used = 0;
    for (size_t i = k; i < out->n; i++) {
        memcpy(tail + used, tk->pieces[out->v[i]], tk->lengths[out->v[i]]);
        used += tk->lengths[out->v[i]];
    }
    memcpy(tail + used, s + valid, n - valid);
    out->n = k;
    encode_piece(bpe, w, tail, len, out);
    free(tail);
}

size_t bpe_encode(const struct bpe *bpe, const void *text, size_t n, int **ids) {
    const unsigned char *s = text;
    // parts are indexed by uint32_t; the CLI caps text far below this
    if (n >= ((size_t)1 << 32) - 1) tp_die(TP_EXIT_USAGE, "cannot encode %zu bytes at once; split the text", n);
    struct bpe_work w = {0};
    struct id_list out = {0};
    size_t valid = bpe_utf8_valid(s, n);
    size_t last = 0; // where the last piece's tokens start
    for (size_t pos = 0; pos < valid;) {
        size_t end = bpe_piece_end(s, valid, pos);
        last = out.n;
        encode_piece(bpe, &w, s + pos, end - pos, &out);
        pos = end;
    }
    if (valid < n) encode_tail(bpe, &w, s, n, valid, last, &out);
    work_free(&w);
    *ids = out.v;
    return out.n;
}

// ---- setup

int bpe_create(struct bpe *bpe, const struct tokenizer *tk, const char *path, char *err, size_t errlen) {
    memset(bpe, 0, sizeof *bpe);
    if (tk->version < (int)TOKENIZER_VERSION)
        return tp_errf(err, errlen, "%s: tokenizer version %d holds no merges, so it decodes but cannot encode "
                       "text; rebuild it as version %u with scripts/make_tokenizer_bin.py, or give token ids "
                       "(--prompt-tokens FILE)", path, tk->version, TOKENIZER_VERSION);
    for (int b = 0; b < 256; b++) bpe->byte_token[b] = -1;
    for (int id = 0; id < tk->vocab_size; id++) {
        unsigned char b = (unsigned char)tk->pieces[id][0];
        if (tk->lengths[id] == 1 && bpe->byte_token[b] < 0) bpe->byte_token[b] = id;
    }
    for (int b = 0; b < 256; b++)
        if (bpe->byte_token[b] < 0)
            return tp_errf(err, errlen, "%s: no token is the single byte 0x%02X, and byte-level BPE needs one for "
                           "every byte; rebuild it with scripts/make_tokenizer_bin.py", path, b);
    size_t cap = 64;
    while (cap < 2 * (size_t)tk->n_merges) cap *= 2;
    bpe->slots = tp_malloc(cap * sizeof *bpe->slots);
    for (size_t i = 0; i < cap; i++) bpe->slots[i].rank = BPE_NO_RANK;
    bpe->mask = cap - 1;
    bpe->tk = tk;
    for (int r = 0; r < tk->n_merges; r++) {
        const uint32_t *m = tk->merges + 3 * (size_t)r;
        size_t i = (size_t)tp_splitmix64((uint64_t)m[0] << 32 | m[1]) & bpe->mask;
        while (bpe->slots[i].rank != BPE_NO_RANK) {
            if (bpe->slots[i].left == m[0] && bpe->slots[i].right == m[1]) {
                int first = bpe->slots[i].rank;
                bpe_free(bpe);
                return tp_errf(err, errlen, "%s: merge %d at byte offset %zu repeats merge %d (tokens %u and %u); "
                               "rebuild it with scripts/make_tokenizer_bin.py", path, r,
                               tk->merges_offset + 12 * (size_t)r, first, m[0], m[1]);
            }
            i = (i + 1) & bpe->mask;
        }
        bpe->slots[i] = (struct bpe_slot){.left = m[0], .right = m[1], .rank = r, .result = (int32_t)m[2]};
    }
    return 0;
}

void bpe_free(struct bpe *bpe) {
    free(bpe->slots);
    memset(bpe, 0, sizeof *bpe);
}
