// tokenizer.c: reads the GPT-2 tokenizer file (tokenizer.h has the layout): version 2, llm.c's
// decode table, and version 3, which adds the merges the encoder needs.
//
// The whole file is read into memory and every length, id and offset is checked against its size
// before anything is trusted, so a truncated or corrupted file fails with its byte offset.
#include "tokenizer.h"

#include "common.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>

// A GPT-2 file is about 1 MB; the largest header a vocabulary of 2^24 could need is far below this.
#define TOKENIZER_MAX_BYTES ((size_t)1 << 30)
#define MERGE_BYTES (3 * sizeof(uint32_t))

static const char *const fix_hint =
    "restore data/gpt2_tokenizer.bin from the repository, or rebuild it with scripts/make_tokenizer_bin.py";

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

// Reads the whole file into *buf (malloc'd). Returns 0 or TP_EXIT_USAGE with err set.
static int read_file(const char *path, unsigned char **buf, size_t *size, char *err, size_t errlen) {
    *buf = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return tp_errf(err, errlen, "%s: cannot open the tokenizer: %s; it ships as data/gpt2_tokenizer.bin "
                       "(run from the repository root, or pass --tokenizer FILE)", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fclose(f);
        return tp_errf(err, errlen, "%s: not a regular file; pass the tokenizer file itself", path);
    }
    size_t n = (size_t)sb.st_size;
    if (n > TOKENIZER_MAX_BYTES) {
        fclose(f);
        return tp_errf(err, errlen, "%s: %zu bytes, more than the %zu a tokenizer file may have; %s", path, n,
                       TOKENIZER_MAX_BYTES, fix_hint);
    }
    unsigned char *b = tp_malloc(n);
    size_t got = fread(b, 1, n, f);
    int bad = ferror(f);
    fclose(f);
    if (got != n || bad) {
        free(b);
        return tp_errf(err, errlen, "%s: read %zu of %zu bytes (the file changed or the disk failed); %s", path,
                       got, n, fix_hint);
    }
    *buf = b;
    *size = n;
    return 0;
}

// Checks the merge records that start at byte `at` of buf (size bytes in all) against the table.
static int check_merges(const struct tokenizer *tk, const unsigned char *buf, size_t size, size_t at,
                        const char *path, char *err, size_t errlen) {
    size_t want = (size_t)tk->n_merges * MERGE_BYTES, have = size - at;
    if (have < want)
        return tp_errf(err, errlen, "%s: truncated at byte offset %zu: the merges end at merge %zu of %d; %s",
                       path, at + have / MERGE_BYTES * MERGE_BYTES, have / MERGE_BYTES, tk->n_merges, fix_hint);
    if (have > want)
        return tp_errf(err, errlen, "%s: %zu unexpected bytes after the last merge, at byte offset %zu; %s", path,
                       have - want, at + want, fix_hint);
    uint32_t V = (uint32_t)tk->vocab_size;
    for (int i = 0; i < tk->n_merges; i++) {
        size_t off = at + (size_t)i * MERGE_BYTES;
        uint32_t l = le32(buf + off), r = le32(buf + off + 4), res = le32(buf + off + 8);
        if (l >= V || r >= V || res >= V)
            return tp_errf(err, errlen, "%s: merge %d at byte offset %zu names token %u, outside the vocabulary "
                           "of %u; %s", path, i, off, l >= V ? l : r >= V ? r : res, V, fix_hint);
        size_t ll = tk->lengths[l], lr = tk->lengths[r];
        if (ll + lr != tk->lengths[res] || memcmp(tk->pieces[res], tk->pieces[l], ll) != 0 ||
            memcmp(tk->pieces[res] + ll, tk->pieces[r], lr) != 0)
            return tp_errf(err, errlen, "%s: merge %d at byte offset %zu: token %u is not token %u followed by "
                           "token %u; %s", path, i, off, res, l, r, fix_hint);
    }
    return 0;
}

int tokenizer_load(struct tokenizer *tk, const char *path, char *err, size_t errlen) {
    memset(tk, 0, sizeof *tk);
    unsigned char *buf;
    size_t size = 0;
    int st = read_file(path, &buf, &size, err, errlen);
    if (st) return st;
    const size_t header_bytes = TOKENIZER_HEADER_INTS * sizeof(uint32_t);
    uint32_t magic = size >= 4 ? le32(buf) : 0, version = size >= 8 ? le32(buf + 4) : 0;
    uint32_t vocab = 0, eot = 0, n_merges = 0;
    if (size < header_bytes) {
        st = tp_errf(err, errlen, "%s: truncated header: %zu of %zu bytes; %s", path, size, header_bytes, fix_hint);
    } else if (magic != TOKENIZER_MAGIC) {
        st = tp_errf(err, errlen, "%s: bad magic %u (expected %u): not a GPT-2 tokenizer file; %s", path, magic,
                     TOKENIZER_MAGIC, fix_hint);
    } else if (version != TOKENIZER_VERSION_DECODE && version != TOKENIZER_VERSION) {
        st = tp_errf(err, errlen, "%s: unsupported tokenizer version %u (expected %u or %u); %s", path, version,
                     TOKENIZER_VERSION_DECODE, TOKENIZER_VERSION, fix_hint);
    } else {
        vocab = le32(buf + 8);
        eot = le32(buf + 12);
        if (vocab == 0 || vocab > (1u << 24) || eot >= vocab)
            st = tp_errf(err, errlen, "%s: implausible header at byte offset 8: vocab size %u, EOT id %u; %s", path,
                         vocab, eot, fix_hint);
    }
    if (!st && version == TOKENIZER_VERSION) {
        n_merges = le32(buf + 16);
        uint32_t pre = le32(buf + 20);
        if (n_merges >= vocab)
            st = tp_errf(err, errlen, "%s: implausible header at byte offset 16: %u merges for a vocabulary of %u; "
                         "%s", path, n_merges, vocab, fix_hint);
        else if (pre != TOKENIZER_PRETOKENIZER_GPT2)
            st = tp_errf(err, errlen, "%s: pre-tokeniser %u at byte offset 20 is not supported (%u is GPT-2's "
                         "pattern, the only one tptrain implements); %s", path, pre, TOKENIZER_PRETOKENIZER_GPT2,
                         fix_hint);
    }
    // The table: find where it ends, checking every length against the file size.
    size_t off = header_bytes;
    for (uint32_t i = 0; !st && i < vocab; i++) {
        if (off >= size)
            st = tp_errf(err, errlen, "%s: truncated at byte offset %zu: the table ends at token %u of %u; %s", path,
                         off, i, vocab, fix_hint);
        else if (size - off - 1 < buf[off])
            st = tp_errf(err, errlen, "%s: truncated at byte offset %zu: token %u needs %u bytes; %s", path, off + 1,
                         i, buf[off], fix_hint);
        else
            off += 1 + (size_t)buf[off];
    }
    if (st) {
        free(buf);
        return st;
    }
    // All pieces live in one block in token order, so pieces[0] owns it (see tokenizer_free).
    size_t table_end = off;
    char *blob = tp_malloc(table_end - header_bytes); // each piece's length byte becomes its NUL
    tk->pieces = tp_malloc(vocab * sizeof *tk->pieces);
    tk->lengths = tp_malloc(vocab);
    size_t used = 0;
    off = header_bytes;
    for (uint32_t i = 0; i < vocab; i++) {
        size_t len = buf[off];
        memcpy(blob + used, buf + off + 1, len);
        blob[used + len] = '\0';
        tk->pieces[i] = blob + used;
        tk->lengths[i] = (unsigned char)len;
        used += len + 1;
        off += 1 + len;
    }
    tk->version = (int)version;
    tk->vocab_size = (int)vocab;
    tk->eot = (int)eot;
    tk->n_merges = (int)n_merges;
    tk->merges_offset = table_end;
    if (version == TOKENIZER_VERSION) {
        st = check_merges(tk, buf, size, table_end, path, err, errlen);
        if (!st) {
            tk->merges = tp_malloc((size_t)n_merges * MERGE_BYTES + 1);
            for (size_t k = 0; k < 3 * (size_t)n_merges; k++) tk->merges[k] = le32(buf + table_end + 4 * k);
        }
    }
    free(buf);
    if (st) tokenizer_free(tk);
    return st;
}

const char *tokenizer_decode(const struct tokenizer *tk, int token) {
    if (!tk->pieces || token < 0 || token >= tk->vocab_size) return "";
    return tk->pieces[token];
}

void tokenizer_free(struct tokenizer *tk) {
    if (tk->pieces) free(tk->pieces[0]); // the block holding every piece
    free(tk->pieces);
    free(tk->lengths);
    free(tk->merges);
    memset(tk, 0, sizeof *tk);
}
