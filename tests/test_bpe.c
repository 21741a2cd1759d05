// test_bpe.c: the GPT-2 BPE encoder (src/bpe.c) and the tokenizer file it reads (src/tokenizer.c).
//
// The reference is tiktoken's gpt2 encoding: the shipped Tiny Shakespeare shards are its ids (both
// the whole-text pair and llm.c's sections; tests/bpe_tiktoken.py checks that), and
// tests/data/bpe_stress.ids and tests/data/bpe_cases.txt hold its ids of a Unicode stress text and
// of short and invalid-UTF-8 byte strings (tests/bpe_tiktoken.py write made them). Beyond equality:
// every input, however broken, encodes to ids that decode to its bytes (run under ASan in CI), and
// every malformed tokenizer file is refused with its file and byte offset.
#include <criterion/criterion.h>

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bpe.h"
#include "common.h"
#include "testutil.h"
#include "tokenizer.h"

// ---- helpers

static void source_path(char *out, size_t len, const char *rel) {
    snprintf(out, len, "%s/%s", tu_source_root(), rel);
}

// The whole file (caller frees); *n bytes. A NUL follows the bytes.
static unsigned char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    cr_assert(f, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)len + 1);
    cr_assert_eq(fread(b, 1, (size_t)len, f), (size_t)len, "cannot read %s", path);
    fclose(f);
    b[len] = 0;
    *n = (size_t)len;
    return b;
}

static void spit(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    cr_assert(f, "cannot create %s", path);
    cr_assert_eq(fwrite(data, 1, n, f), n);
    cr_assert_eq(fclose(f), 0);
}

static struct tokenizer g_tk;
static struct bpe g_bpe;

static void load_gpt2(void) {
    char path[1024], err[1024] = "";
    source_path(path, sizeof path, "data/gpt2_tokenizer.bin");
    cr_assert_eq(tokenizer_load(&g_tk, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(bpe_create(&g_bpe, &g_tk, path, err, sizeof err), 0, "%s", err);
}

static void unload_gpt2(void) {
    bpe_free(&g_bpe);
    tokenizer_free(&g_tk);
}

TestSuite(bpe, .init = load_gpt2, .fini = unload_gpt2, .timeout = 120);

// The tokens of a shard file (llm.c's format); *n of them.
static uint16_t *read_shard(const char *rel, size_t *n) {
    char path[1024];
    source_path(path, sizeof path, rel);
    size_t bytes;
    unsigned char *b = slurp(path, &bytes);
    int32_t header[3];
    memcpy(header, b, sizeof header);
    cr_assert(bytes >= 1024 && header[0] == 20240520 && (size_t)header[2] * 2 + 1024 == bytes, "%s: not a shard", path);
    *n = (size_t)header[2];
    uint16_t *t = malloc(*n * sizeof *t + 1);
    memcpy(t, b + 1024, *n * sizeof *t);
    free(b);
    return t;
}

// Whitespace-separated ids from a string; *n of them.
static int *parse_ids(const char *s, size_t *n) {
    size_t cap = 16, k = 0;
    int *v = malloc(cap * sizeof *v);
    for (char *end;; s = end) {
        long x = strtol(s, &end, 10);
        if (end == s) break;
        if (k == cap) v = realloc(v, (cap *= 2) * sizeof *v);
        v[k++] = (int)x;
    }
    *n = k;
    return v;
}

// The bytes of ids [0, n) through the decode table (caller frees); *len bytes.
static unsigned char *decode(const int *ids, size_t n, size_t *len) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) total += g_tk.lengths[ids[i]];
    unsigned char *out = malloc(total + 1);
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        memcpy(out + used, g_tk.pieces[ids[i]], g_tk.lengths[ids[i]]);
        used += g_tk.lengths[ids[i]];
    }
    *len = total;
    return out;
}

// Asserts that text encodes to want (n ids), naming the first difference.
static void expect_ids(const void *text, size_t len, const int *want, size_t n, const char *what) {
    int *got;
    size_t m = bpe_encode(&g_bpe, text, len, &got);
    size_t i = 0;
    while (i < m && i < n && got[i] == want[i]) i++;
    cr_assert(i == m && i == n, "%s: %zu ids against tiktoken's %zu; first difference at id %zu: %d, tiktoken %d",
              what, m, n, i, i < m ? got[i] : -1, i < n ? want[i] : -1);
    free(got);
}

// ---- Unicode classes, UTF-8 and the pre-tokeniser

Test(bpe, unicode_table) {
    for (int i = 1; i < bpe_unicode_n_ranges; i++)
        cr_assert_gt(bpe_unicode_ranges[i].first, bpe_unicode_ranges[i - 1].last, "ranges %d and %d", i - 1, i);
    struct { uint32_t cp; enum bpe_class cls; } cases[] = {
        {'A', BPE_LETTER}, {'z', BPE_LETTER}, {'5', BPE_NUMBER}, {' ', BPE_SPACE}, {'\t', BPE_SPACE},
        {'\r', BPE_SPACE}, {0x0B, BPE_SPACE}, {'\'', BPE_OTHER}, {'_', BPE_OTHER}, {0x1C, BPE_OTHER}, // not White_Space
        {0x85, BPE_SPACE}, {0xA0, BPE_SPACE}, {0x2003, BPE_SPACE}, {0x2028, BPE_SPACE}, {0x3000, BPE_SPACE},
        {0x200B, BPE_OTHER}, {0xFEFF, BPE_OTHER}, {0x180E, BPE_OTHER}, // zero width: format characters
        {0xE9, BPE_LETTER}, {0x4E00, BPE_LETTER}, {0xAC00, BPE_LETTER}, {0x05D0, BPE_LETTER}, {0x0301, BPE_OTHER},
        {0x093F, BPE_OTHER}, {0x0661, BPE_NUMBER}, {0x0967, BPE_NUMBER}, {0x2167, BPE_NUMBER}, {0xB2, BPE_NUMBER},
        {0xBD, BPE_NUMBER}, {0xFF15, BPE_NUMBER}, {0x1F600, BPE_OTHER}, {0x200D, BPE_OTHER}, {0xFE0F, BPE_OTHER},
        {0x20000, BPE_LETTER}, {0x1E290, BPE_LETTER}, {0x11F04, BPE_LETTER}, {0x1C89, BPE_LETTER}, // 14, 15, 16.0
        {0xE000, BPE_OTHER}, {0x10FFFF, BPE_OTHER},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        cr_assert_eq(bpe_unicode_class(cases[i].cp), cases[i].cls, "U+%04X: class %d, expected %d", cases[i].cp,
                     bpe_unicode_class(cases[i].cp), cases[i].cls);
    cr_assert_str_eq(bpe_unicode_version, "16.0.0", "tiktoken 0.14's regex tables are Unicode 16.0");
}

Test(bpe, utf8_rules) {
    struct { const char *s; size_t len; size_t want; } cases[] = {
        {"a", 1, 1}, {"\xc3\xa9", 2, 2}, {"\xe2\x82\xac", 3, 3}, {"\xf0\x9f\x98\x80", 4, 4}, {"\xf4\x8f\xbf\xbf", 4, 4},
        {"\x80", 1, 0}, {"\xc0\xaf", 2, 0}, {"\xc1\xbf", 2, 0}, {"\xe0\x80\x80", 3, 0}, {"\xe0\x9f\xbf", 3, 0},
        {"\xed\xa0\x80", 3, 0}, {"\xed\x9f\xbf", 3, 3}, {"\xf0\x8f\xbf\xbf", 4, 0}, {"\xf4\x90\x80\x80", 4, 0},
        {"\xf5\x80\x80\x80", 4, 0}, {"\xff", 1, 0}, {"\xe2\x82", 2, 0}, {"\xf0\x9f\x98", 3, 0}, {"\xc3", 1, 0},
        {"\xe2\x28\xa1", 3, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        cr_assert_eq(bpe_utf8_char((const unsigned char *)cases[i].s, cases[i].len), cases[i].want, "case %zu", i);
    const unsigned char text[] = "ok \xc3\xa9 \xe2\x82"; // a character cut at the end
    cr_assert_eq(bpe_utf8_valid(text, sizeof text - 1), 6);
    cr_assert_eq(bpe_utf8_valid(text, 0), 0);
}

// Pieces as the pattern cuts them (checked with Python's regex module on the original pattern).
Test(bpe, pretokenizer_pieces) {
    struct { const char *text; const char *pieces[12]; } cases[] = {
        {"Hello world's  end", {"Hello", " world", "'s", " ", " end"}},
        {"I'M don't 'LL we'Re", {"I", "'", "M", " don", "'t", " '", "LL", " we", "'", "Re"}},
        {"a  \n\n  b\t\tc ", {"a", "  \n\n ", " b", "\t", "\t", "c", " "}},
        {"x\r\ny \xc2\xa0z", {"x", "\r", "\n", "y", " ", "\xc2\xa0", "z"}},
        {"12ab 34 !?'s", {"12", "ab", " 34", " !?'", "s"}},
        {"caf\xc3\xa9 e\xcc\x81x \xe4\xbd\xa0\xe5\xa5\xbd\xef\xbc\x8c", {"caf\xc3\xa9", " e", "\xcc\x81", "x", " \xe4\xbd\xa0\xe5\xa5\xbd", "\xef\xbc\x8c"}},
        {"  ", {"  "}},
        {" \n", {" \n"}},
        {"?'s", {"?'", "s"}},
        {"'ll've'", {"'ll", "'ve", "'"}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const unsigned char *s = (const unsigned char *)cases[c].text;
        size_t n = strlen(cases[c].text), pos = 0, k = 0;
        for (; pos < n; k++) {
            size_t end = bpe_piece_end(s, n, pos);
            cr_assert_gt(end, pos);
            cr_assert(cases[c].pieces[k], "case %zu: more pieces than expected, then '%.*s'", c, (int)(end - pos), s + pos);
            cr_assert(end - pos == strlen(cases[c].pieces[k]) && memcmp(s + pos, cases[c].pieces[k], end - pos) == 0,
                      "case %zu piece %zu: '%.*s', expected '%s'", c, k, (int)(end - pos), s + pos, cases[c].pieces[k]);
            pos = end;
        }
        cr_assert_null(cases[c].pieces[k], "case %zu: fewer pieces than expected", c);
    }
}

// ---- against tiktoken

// BPE of any ordinary token's bytes gives that token back (so tiktoken's whole-piece shortcut
// changes nothing, and the merges are complete).
Test(bpe, every_token_merges_back_to_itself) {
    int out[256];
    for (int id = 0; id < g_tk.vocab_size; id++) {
        if (id == g_tk.eot) continue;
        size_t m = bpe_merge_piece(&g_bpe, (const unsigned char *)g_tk.pieces[id], g_tk.lengths[id], out);
        cr_assert(m == 1 && out[0] == id, "token %d gives %zu ids (first %d)", id, m, out[0]);
    }
}

// The shipped shards are tiktoken's ids of end-of-text + the whole of Tiny Shakespeare: decoded,
// the text encodes back to them. Encoding the ~1.1 MB takes well under a second.
Test(bpe, tiny_shakespeare_equals_tiktoken) {
    size_t nv, nt;
    uint16_t *val = read_shard("data/tinyshakespeare_val.bin", &nv);
    uint16_t *train = read_shard("data/tinyshakespeare_train.bin", &nt);
    size_t n = nv + nt - 1;
    int *want = malloc(n * sizeof *want);
    cr_assert_eq(val[0], 50256);
    for (size_t i = 1; i < nv; i++) want[i - 1] = val[i];
    for (size_t i = 0; i < nt; i++) want[nv - 1 + i] = train[i];
    size_t len;
    unsigned char *text = decode(want, n, &len);
    cr_assert_eq(len, 1115394, "Tiny Shakespeare is 1,115,394 bytes");
    double t0 = tp_now();
    int *got;
    size_t m = bpe_encode(&g_bpe, text, len, &got);
    double secs = tp_now() - t0;
    cr_log_info("Tiny Shakespeare: %zu bytes -> %zu ids in %.3f s (%.1f MB/s)", len, m, secs, len / secs / 1e6);
    fprintf(stderr, "bpe: Tiny Shakespeare, %zu bytes -> %zu ids in %.3f s (%.1f MB/s)\n", len, m, secs, len / secs / 1e6);
    free(got);
    expect_ids(text, len, want, n, "Tiny Shakespeare");
#if !defined(__SANITIZE_ADDRESS__)
    cr_assert_lt(secs, 1.0, "encoding Tiny Shakespeare took %.2f s", secs);
#endif
    free(text);
    free(want);
    free(val);
    free(train);
}

// llm.c's shards: an end-of-text before each blank-line-separated section, each section encoded on
// its own (data/tinyshakespeare_llmc_*.bin, made by scripts/prepare_data.py --llmc).
Test(bpe, llmc_sections_equal_tiktoken) {
    size_t nv, nt;
    uint16_t *val = read_shard("data/tinyshakespeare_llmc_val.bin", &nv);
    uint16_t *train = read_shard("data/tinyshakespeare_llmc_train.bin", &nt);
    cr_assert_eq(nv, 32768);
    cr_assert_eq(nt, 305260);
    size_t n = nv + nt, sections = 0;
    int *all = malloc(n * sizeof *all);
    for (size_t i = 0; i < nv; i++) all[i] = val[i];
    for (size_t i = 0; i < nt; i++) all[nv + i] = train[i];
    cr_assert_eq(all[0], 50256);
    for (size_t a = 0; a < n;) {
        size_t b = a + 1;
        while (b < n && all[b] != 50256) b++;
        size_t len;
        unsigned char *text = decode(all + a + 1, b - a - 1, &len);
        char what[64];
        snprintf(what, sizeof what, "section %zu (token %zu)", sections, a);
        expect_ids(text, len, all + a + 1, b - a - 1, what);
        free(text);
        sections++;
        a = b;
    }
    cr_assert_eq(sections, 7222);
    free(all);
    free(val);
    free(train);
}

Test(bpe, unicode_stress_text_equals_tiktoken) {
    char path[1024];
    size_t len, n_text;
    source_path(path, sizeof path, "tests/data/bpe_stress.ids");
    char *ids_text = (char *)slurp(path, &n_text);
    size_t n;
    int *want = parse_ids(ids_text, &n);
    source_path(path, sizeof path, "tests/data/bpe_stress.txt");
    unsigned char *text = slurp(path, &len);
    cr_assert_gt(n, 1000);
    expect_ids(text, len, want, n, "tests/data/bpe_stress.txt");
    free(text);
    free(want);
    free(ids_text);
}

static int hex_digit(char c) { return c <= '9' ? c - '0' : c - 'a' + 10; }

// Short edge cases and bytes that are not UTF-8: tiktoken's Encoding._encode_bytes ids.
Test(bpe, byte_cases_equal_tiktoken) {
    char path[1024];
    size_t len;
    source_path(path, sizeof path, "tests/data/bpe_cases.txt");
    char *all = (char *)slurp(path, &len);
    int cases = 0;
    for (char *line = all, *next; *line; line = next) {
        next = strchr(line, '\n');
        cr_assert(next, "unterminated line");
        *next++ = '\0';
        char *tab = strchr(line, '\t');
        cr_assert(tab, "line %d has no tab", cases + 1);
        size_t nb = (size_t)(tab - line) / 2;
        unsigned char *bytes = malloc(nb + 1);
        for (size_t i = 0; i < nb; i++) bytes[i] = (unsigned char)(hex_digit(line[2 * i]) * 16 + hex_digit(line[2 * i + 1]));
        size_t n;
        int *want = parse_ids(tab + 1, &n);
        char what[64];
        snprintf(what, sizeof what, "case %d (%zu bytes)", cases + 1, nb);
        expect_ids(bytes, nb, want, n, what);
        free(want);
        free(bytes);
        cases++;
    }
    cr_assert_geq(cases, 60);
    free(all);
}

// scripts/prepare_data.py remakes both shipped pairs from the text: --val-tokens 32768 tptrain's
// own, --llmc llm.c's (skipped where python3 has no tiktoken).
Test(bpe, prepare_data_remakes_the_shipped_shards) {
    char dir[512], path[1200], out[8192];
    if (tu_run(out, sizeof out, "python3 -c 'import tiktoken'") != 0) cr_skip_test("python3 has no tiktoken");
    tu_tmpdir(dir, sizeof dir, "bpe");
    size_t nv, nt;
    uint16_t *val = read_shard("data/tinyshakespeare_val.bin", &nv);
    uint16_t *train = read_shard("data/tinyshakespeare_train.bin", &nt);
    int *ids = malloc((nv + nt) * sizeof *ids);
    for (size_t i = 0; i < nv; i++) ids[i] = val[i];
    for (size_t i = 0; i < nt; i++) ids[nv + i] = train[i];
    size_t len;
    unsigned char *text = decode(ids + 1, nv + nt - 1, &len); // after the end-of-text
    snprintf(path, sizeof path, "%s/input.txt", dir);
    spit(path, text, len);
    int rc = tu_run(out, sizeof out, "cd '%s' && python3 scripts/prepare_data.py --input '%s' --out-prefix '%s/a' "
                    "--val-tokens 32768 && python3 scripts/prepare_data.py --llmc --input '%s' --out-prefix '%s/b' && "
                    "cmp '%s/a_val.bin' data/tinyshakespeare_val.bin && cmp '%s/a_train.bin' data/tinyshakespeare_train.bin && "
                    "cmp '%s/b_val.bin' data/tinyshakespeare_llmc_val.bin && cmp '%s/b_train.bin' data/tinyshakespeare_llmc_train.bin",
                    tu_source_root(), path, dir, path, dir, dir, dir, dir, dir);
    cr_assert_eq(rc, 0, "prepare_data.py does not remake the shipped shards:\n%s", out);
    cr_assert(strstr(out, "305260 tokens") && strstr(out, "305258 tokens"), "%s", out);
    free(text);
    free(ids);
    free(val);
    free(train);
    tu_rmtree(dir);
}

// ---- any input

// Random bytes, random code points and mixtures of both: every input encodes to ordinary tokens
// that decode to exactly its bytes.
Test(bpe, any_bytes_round_trip) {
    static const char *const frags[] = {" ", "  ", "\n", "\t", "\r\n", "'", "'s", "'LL", "a", "Z", "7", "\xc2\xa0",
                                        "\xe3\x80\x80", "\xcc\x81", "\xe4\xbd\xa0", "\xf0\x9f\x91\x8d", "\xe2\x80\x8d",
                                        "\xff", "\x80", "\xc3", "\xed\xa0\x80", "\xf0\x9f", "!", "\xd9\xa1"};
    uint64_t rng = 42;
    unsigned char buf[4096];
    for (int round = 0; round < 3000; round++) {
        size_t n = (size_t)(tu_rng_next(&rng) % (round < 2900 ? 200 : sizeof buf));
        int mode = round % 3;
        size_t k = 0;
        while (k < n) {
            uint64_t r = tu_rng_next(&rng);
            if (mode == 0) {
                buf[k++] = (unsigned char)r;
            } else {
                const char *f = frags[r % (sizeof frags / sizeof frags[0])];
                size_t fl = strlen(f);
                if (mode == 1 && (unsigned char)f[0] >= 0x80 && bpe_utf8_char((const unsigned char *)f, fl) != fl) f = "b", fl = 1;
                for (size_t i = 0; i < fl && k < n; i++) buf[k++] = (unsigned char)f[i];
            }
        }
        int *ids;
        size_t m = bpe_encode(&g_bpe, buf, n, &ids);
        for (size_t i = 0; i < m; i++)
            cr_assert(ids[i] >= 0 && ids[i] < g_tk.eot, "round %d: id %d", round, ids[i]);
        size_t len;
        unsigned char *back = decode(ids, m, &len);
        cr_assert(len == n && memcmp(back, buf, n) == 0, "round %d (mode %d, %zu bytes): decoding gives %zu other bytes",
                  round, mode, n, len);
        free(back);
        free(ids);
    }
}

// ---- the tokenizer file

// A copy of the shipped file in a scratch directory; returns its bytes (caller frees).
static unsigned char *copy_tokenizer(char *path, size_t plen, const char *dir, size_t *n) {
    char src[1024];
    source_path(src, sizeof src, "data/gpt2_tokenizer.bin");
    unsigned char *b = slurp(src, n);
    snprintf(path, plen, "%s/tok.bin", dir);
    spit(path, b, *n);
    return b;
}

static void put32(unsigned char *b, size_t off, uint32_t v) {
    for (int i = 0; i < 4; i++) b[off + i] = (unsigned char)(v >> (8 * i));
}

// tokenizer_load fails with one line holding the path and both needles.
static void expect_load_error(const char *path, const char *needle1, const char *needle2) {
    struct tokenizer tk;
    char err[1024] = "";
    cr_assert_eq(tokenizer_load(&tk, path, err, sizeof err), TP_EXIT_USAGE, "loaded %s", path);
    cr_assert_null(strchr(err, '\n'), "one line: %s", err);
    cr_assert(strstr(err, path), "error lacks the path: %s", err);
    cr_assert(strstr(err, needle1), "error lacks '%s': %s", needle1, err);
    if (needle2) cr_assert(strstr(err, needle2), "error lacks '%s': %s", needle2, err);
    cr_assert_null(tk.pieces);
}

Test(bpe, tokenizer_file_versions) {
    cr_assert_eq(g_tk.version, 3);
    cr_assert_eq(g_tk.n_merges, 50000);
    cr_assert_eq(g_tk.merges_offset, 372108, "the decode table is llm.c's version 2 table, unchanged");
    cr_assert_str_eq(tokenizer_decode(&g_tk, 464), "The");

    // version 2 (llm.c's file): the same table without the merges decodes, and cannot encode
    char dir[512], path[1024], err[1024] = "";
    tu_tmpdir(dir, sizeof dir, "bpe");
    size_t n;
    unsigned char *b = copy_tokenizer(path, sizeof path, dir, &n);
    put32(b, 4, 2);
    put32(b, 16, 0);
    put32(b, 20, 0);
    spit(path, b, g_tk.merges_offset);
    struct tokenizer tk;
    cr_assert_eq(tokenizer_load(&tk, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(tk.version, 2);
    cr_assert_eq(tk.n_merges, 0);
    cr_assert_str_eq(tokenizer_decode(&tk, 464), "The");
    cr_assert_eq(tk.lengths[50256], 13);
    struct bpe bpe;
    cr_assert_eq(bpe_create(&bpe, &tk, path, err, sizeof err), TP_EXIT_USAGE);
    cr_assert(strstr(err, path) && strstr(err, "version 2 holds no merges") && strstr(err, "make_tokenizer_bin.py"), "%s",
              err);
    tokenizer_free(&tk);
    free(b);
    tu_rmtree(dir);
}

Test(bpe, corrupted_tokenizer_files_are_refused) {
    char dir[512], path[1024], err[1024] = "";
    tu_tmpdir(dir, sizeof dir, "bpe");
    size_t n, m0 = g_tk.merges_offset;
    unsigned char *good = copy_tokenizer(path, sizeof path, dir, &n);
    unsigned char *b = malloc(n + 16);
    char where[64];

#define FRESH() memcpy(b, good, n)
    FRESH();
    put32(b, 4, 4);
    spit(path, b, n);
    expect_load_error(path, "version 4 (expected 2 or 3)", NULL);

    FRESH();
    put32(b, 20, 2);
    spit(path, b, n);
    expect_load_error(path, "pre-tokeniser 2 at byte offset 20", NULL);

    FRESH();
    put32(b, 16, 50257);
    spit(path, b, n);
    expect_load_error(path, "byte offset 16", "50257 merges");

    FRESH(); // a merge naming a token past the vocabulary
    put32(b, m0 + 12 * 7 + 4, 60000);
    spit(path, b, n);
    snprintf(where, sizeof where, "merge 7 at byte offset %zu", m0 + 12 * 7);
    expect_load_error(path, where, "token 60000");

    FRESH(); // a result that is not left + right
    put32(b, m0 + 12 * 100 + 8, 464);
    spit(path, b, n);
    snprintf(where, sizeof where, "merge 100 at byte offset %zu", m0 + 12 * 100);
    expect_load_error(path, where, "token 464 is not token");

    FRESH(); // cut inside the merges
    spit(path, b, m0 + 12 * 30 + 5);
    snprintf(where, sizeof where, "truncated at byte offset %zu", m0 + 12 * 30);
    expect_load_error(path, where, "merge 30 of 50000");

    FRESH(); // bytes after the last merge
    b[n] = 0;
    spit(path, b, n + 1);
    expect_load_error(path, "1 unexpected bytes after the last merge", NULL);

    FRESH(); // cut inside the table
    spit(path, b, 5000);
    expect_load_error(path, "truncated at byte offset", NULL);

    FRESH(); // the same merge twice: loads, and the encoder refuses it
    memcpy(b + m0 + 12 * 9, b + m0 + 12 * 2, 12);
    spit(path, b, n);
    struct tokenizer tk;
    cr_assert_eq(tokenizer_load(&tk, path, err, sizeof err), 0, "%s", err);
    struct bpe bpe;
    cr_assert_eq(bpe_create(&bpe, &tk, path, err, sizeof err), TP_EXIT_USAGE);
    snprintf(where, sizeof where, "merge 9 at byte offset %zu repeats merge 2", m0 + 12 * 9);
    cr_assert(strstr(err, path) && strstr(err, where), "%s", err);
    tokenizer_free(&tk);

    FRESH();
    spit(path, b, 100);
    expect_load_error(path, "truncated header", NULL);
    char missing[1100];
    snprintf(missing, sizeof missing, "%s/absent.bin", dir);
    expect_load_error(missing, "cannot open", "--tokenizer");
#undef FRESH
    free(b);
    free(good);
    tu_rmtree(dir);
}

// A small vocabulary in another id order (bytes in byte order, two merges): the format names every
// id, so any byte-level BPE fits; a byte without a token is refused by the encoder.
static size_t small_tokenizer(unsigned char *b, int missing_byte) {
    memset(b, 0, 1024);
    put32(b, 0, TOKENIZER_MAGIC);
    put32(b, 4, 3);
    put32(b, 8, 259);  // 256 bytes, "ab", "abc", end-of-text
    put32(b, 12, 258);
    put32(b, 16, 2);
    put32(b, 20, 1);
    size_t off = 1024;
    for (int i = 0; i < 256; i++) {
        b[off++] = i == missing_byte ? 2 : 1;
        b[off++] = (unsigned char)i;
        if (i == missing_byte) b[off++] = (unsigned char)i;
    }
    const char *extra[3] = {"ab", "abc", "<|endoftext|>"};
    for (int i = 0; i < 3; i++) {
        b[off++] = (unsigned char)strlen(extra[i]);
        memcpy(b + off, extra[i], strlen(extra[i]));
        off += strlen(extra[i]);
    }
    uint32_t merges[6] = {'a', 'b', 256, 256, 'c', 257};
    for (int i = 0; i < 6; i++, off += 4) put32(b, off, merges[i]);
    return off;
}

Test(bpe, other_vocabularies) {
    char dir[512], path[1024], err[1024] = "";
    tu_tmpdir(dir, sizeof dir, "bpe");
    snprintf(path, sizeof path, "%s/small.bin", dir);
    unsigned char b[4096];
    spit(path, b, small_tokenizer(b, -1));
    struct tokenizer tk;
    struct bpe bpe;
    cr_assert_eq(tokenizer_load(&tk, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(bpe_create(&bpe, &tk, path, err, sizeof err), 0, "%s", err);
    int *ids;
    size_t m = bpe_encode(&bpe, "abcab xab", 9, &ids);
    int want[] = {257, 256, ' ', 'x', 256};
    cr_assert_eq(m, 5);
    for (size_t i = 0; i < m; i++) cr_assert_eq(ids[i], want[i], "id %zu: %d", i, ids[i]);
    free(ids);
    bpe_free(&bpe);
    tokenizer_free(&tk);

    spit(path, b, small_tokenizer(b, 0x7A));
    cr_assert_eq(tokenizer_load(&tk, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(bpe_create(&bpe, &tk, path, err, sizeof err), TP_EXIT_USAGE);
    cr_assert(strstr(err, path) && strstr(err, "no token is the single byte 0x7A"), "%s", err);
    tokenizer_free(&tk);
    tu_rmtree(dir);
}
