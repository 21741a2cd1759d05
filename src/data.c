// data.c: llm.c token shards (memory-mapped) and per-DP-rank micro-batches.
//
// The shards matched by one glob form a single token stream; a sequence may start in one shard
// and end in the next. Every token is range-checked as it is read, so a shard made with another
// tokenizer fails with its file and byte offset instead of indexing past the embedding table.
#include "data.h"

#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <stdarg.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define DATA_HEADER_BYTES ((size_t)DATA_HEADER_INTS * sizeof(int32_t))

static const char *const regen_hint = "regenerate it with scripts/prepare_data.py";

// ---- errors


// ---- opening shards

// Maps one shard and checks its header against the file size. On failure nothing stays mapped.
static int shard_open(struct data_shard *sh, const char *path, char *err, size_t errlen) {
    memset(sh, 0, sizeof *sh);
    size_t plen = strlen(path);
    if (plen >= sizeof sh->path)
        return tp_errf(err, errlen, "%s: path is %zu bytes, longer than the %zu the loader supports; "
                       "move the shards to a shorter path", path, plen, sizeof sh->path - 1);
    memcpy(sh->path, path, plen + 1);

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return tp_errf(err, errlen, "%s: cannot open: %s; check the path and its permissions", path,
                       strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return tp_errf(err, errlen, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return tp_errf(err, errlen, "%s: not a regular file; the data pattern should match only "
                       "token shards", path);
    }
    size_t bytes = (size_t)st.st_size;
    if (bytes < DATA_HEADER_BYTES) {
        close(fd);
        return tp_errf(err, errlen, "%s: truncated header: %zu bytes, a shard starts with a "
                       "%zu-byte header; %s", path, bytes, DATA_HEADER_BYTES, regen_hint);
    }
    void *map = mmap(NULL, bytes, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd); // the mapping keeps the file alive
    if (map == MAP_FAILED)
        return tp_errf(err, errlen, "%s: cannot mmap %zu bytes: %s", path, bytes,
                       strerror(map_errno));

    const int32_t *header = map; // (DATA_HEADER_INTS)
    const char *why = NULL;
    char msg[256];
    if (header[0] != DATA_SHARD_MAGIC) {
        snprintf(msg, sizeof msg, "bad magic %d (expected %d): not a tptrain/llm.c token shard; "
                 "check the data path or %s", (int)header[0], DATA_SHARD_MAGIC, regen_hint);
        why = msg;
    } else if (header[1] != DATA_SHARD_VERSION) {
        snprintf(msg, sizeof msg, "unsupported shard version %d (expected %d); %s",
                 (int)header[1], DATA_SHARD_VERSION, regen_hint);
        why = msg;
    } else {
        // The count is stored as int32 by llm.c; read it unsigned so a corrupt negative value
        // shows up as a size mismatch rather than wrapping.
        size_t count = (uint32_t)header[2];
        size_t want = DATA_HEADER_BYTES + count * sizeof(uint16_t);
        if (want != bytes) {
            snprintf(msg, sizeof msg, "truncated or padded: header says %zu tokens (%zu bytes) but "
                     "the file has %zu bytes; %s", count, want, bytes, regen_hint);
            why = msg;
        } else {
            sh->count = count;
        }
    }
    if (why) {
        munmap(map, bytes);
        return tp_errf(err, errlen, "%s: %s", path, why);
    }
    sh->map = map;
    sh->map_bytes = bytes;
    sh->tokens = (const uint16_t *)((const char *)map + DATA_HEADER_BYTES);
    return 0;
}

static int check_args(const char *pattern, int B, int T, int dp_rank, int dp_size, int vocab_size,
                      char *err, size_t errlen) {
    if (B <= 0 || T <= 0)
        return tp_errf(err, errlen, "%s: batch %d x seq_len %d: both must be positive", pattern, B, T);
    if (dp_size <= 0 || dp_rank < 0 || dp_rank >= dp_size)
        return tp_errf(err, errlen, "%s: DP rank %d is outside a DP group of size %d", pattern,
                       dp_rank, dp_size);
    if (vocab_size <= 0)
        return tp_errf(err, errlen, "%s: vocab_size %d must be positive", pattern, vocab_size);
    return 0;
}

int data_open(struct data_loader *dl, const char *glob_pattern, int B, int T, int dp_rank,
              int dp_size, int vocab_size, char *err, size_t errlen) {
    memset(dl, 0, sizeof *dl);
    int rc = check_args(glob_pattern, B, T, dp_rank, dp_size, vocab_size, err, errlen);
    if (rc) return rc;

    glob_t g;
    int grc = glob(glob_pattern, GLOB_ERR, NULL, &g); // glob sorts its matches by default
    if (grc == GLOB_NOMATCH || (grc == 0 && g.gl_pathc == 0)) {
        if (grc == 0) globfree(&g);
        return tp_errf(err, errlen, "%s: no file matches; check the data path in the config, or "
                       "make shards with scripts/prepare_data.py", glob_pattern);
    }
    if (grc != 0)
        return tp_errf(err, errlen, "%s: cannot expand the pattern (%s); check that its "
                       "directories exist and are readable", glob_pattern,
                       grc == GLOB_NOSPACE ? "out of memory" : "read error");

    dl->shards = tp_calloc(g.gl_pathc, sizeof *dl->shards);
    for (size_t i = 0; i < g.gl_pathc; i++) {
        rc = shard_open(&dl->shards[i], g.gl_pathv[i], err, errlen);
        if (rc) break;
        dl->n_shards++;
        dl->total_tokens += dl->shards[i].count;
    }
    size_t n_files = g.gl_pathc;
    globfree(&g);
    if (rc) {
        data_close(dl);
        return rc;
    }

    dl->B = B;
    dl->T = T;
    dl->dp_rank = dp_rank;
    dl->dp_size = dp_size;
    dl->vocab_size = vocab_size;
    if (dl->total_tokens < (size_t)T + 1) {
        tp_errf(err, errlen, "%s: the token stream is too short: %zu tokens in %zu file(s), one "
                "sequence needs seq_len+1 = %zu; add data or lower seq_len", glob_pattern,
                dl->total_tokens, n_files, (size_t)T + 1);
        data_close(dl);
        return TP_EXIT_USAGE;
    }
    // Sequences overlap by one token: the last target of one is the first input of the next.
    dl->n_seqs = (dl->total_tokens - 1) / (size_t)T;
    size_t per_step = (size_t)B * (size_t)dp_size;
    if (dl->n_seqs < per_step) {
        tp_errf(err, errlen, "%s: only %zu sequences of %d+1 tokens in %zu tokens, but one "
                "micro-batch of %d on each of %d DP ranks needs %zu; add data or lower the batch "
                "size or seq_len", glob_pattern, dl->n_seqs, T, dl->total_tokens, B, dp_size,
                per_step);
        data_close(dl);
        return TP_EXIT_USAGE;
    }
    dl->inputs = tp_malloc((size_t)B * (size_t)T * sizeof *dl->inputs);
    dl->targets = tp_malloc((size_t)B * (size_t)T * sizeof *dl->targets);
    dl->position = 0;
    return 0;
}

// ---- batching

size_t data_batches_per_epoch(const struct data_loader *dl) {
    if (!dl->shards || dl->B <= 0 || dl->dp_size <= 0) return 0;
    return dl->n_seqs / ((size_t)dl->B * (size_t)dl->dp_size);
}

void data_seek(struct data_loader *dl, size_t position) { dl->position = position; }

// Copies n tokens starting at global stream index `start` into out, crossing shard boundaries,
// and range-checks each one.
static int read_tokens(const struct data_loader *dl, size_t start, size_t n, int *out, char *err,
                       size_t errlen) {
    // Linear scan for the first shard: a run has tens of shards and B lookups per micro-batch.
    int s = 0;
    size_t off = start;
    while (s < dl->n_shards && off >= dl->shards[s].count) {
        off -= dl->shards[s].count;
        s++;
    }
    for (size_t i = 0; i < n; i++) {
        while (s < dl->n_shards && off >= dl->shards[s].count) { // next non-empty shard
            off = 0;
            s++;
        }
        if (s >= dl->n_shards) // n_seqs guarantees this never happens
            return tp_errf(err, errlen, "data: internal error: token %zu is past the end of the "
                           "%zu-token stream", start + i, dl->total_tokens);
        const struct data_shard *sh = &dl->shards[s];
        uint16_t tok = sh->tokens[off];
        if ((int)tok >= dl->vocab_size)
            return tp_errf(err, errlen, "%s: token %u at byte offset %zu is out of range for "
                           "vocab_size %d; check the model's vocab_size, or the shard was made with another "
                           "tokenizer: %s",
                           sh->path, (unsigned)tok, DATA_HEADER_BYTES + off * sizeof(uint16_t),
                           dl->vocab_size, regen_hint);
        out[i] = tok;
        off++;
    }
    return 0;
}

int data_next(struct data_loader *dl, char *err, size_t errlen) {
    size_t per_epoch = data_batches_per_epoch(dl);
    if (per_epoch == 0) return tp_errf(err, errlen, "data: data_next on a loader that is not open");
    size_t B = (size_t)dl->B, T = (size_t)dl->T, D = (size_t)dl->dp_size;
    size_t k = dl->position % per_epoch;
    // Rank d's micro-batch k is the (k*D + d)-th block of B consecutive sequences, so DP ranks
    // read disjoint blocks and D=1 micro-batches D*k .. D*k+D-1 hold exactly what D ranks read
    // at step k: changing the DP size with matching grad accumulation keeps the data order.
    size_t first_seq = (k * D + (size_t)dl->dp_rank) * B;
    for (size_t j = 0; j < B; j++) {
        size_t start = (first_seq + j) * T;
        int *in = dl->inputs + j * T;   // (T)
        int *tgt = dl->targets + j * T; // (T)
        int rc = read_tokens(dl, start, T, in, err, errlen);
        if (!rc) rc = read_tokens(dl, start + T, 1, tgt + T - 1, err, errlen);
        if (rc) return rc;
        memcpy(tgt, in + 1, (T - 1) * sizeof *tgt);
    }
    dl->position++;
    return 0;
}

void data_close(struct data_loader *dl) {
    for (int i = 0; i < dl->n_shards; i++)
        if (dl->shards[i].map) munmap(dl->shards[i].map, dl->shards[i].map_bytes);
    free(dl->shards);
    free(dl->inputs);
    free(dl->targets);
    memset(dl, 0, sizeof *dl);
}

// ---- writing shards

static int write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int data_write_shard(const char *path, const uint16_t *tokens, size_t count) {
    if (count > (size_t)INT32_MAX) {
        errno = EOVERFLOW;
        return -1;
    }
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 5);
    if (!tmp) return -1;
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);

    int32_t header[DATA_HEADER_INTS] = {DATA_SHARD_MAGIC, DATA_SHARD_VERSION, (int32_t)count};
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int ok = fd >= 0 && write_all(fd, header, sizeof header) == 0 &&
             write_all(fd, tokens, count * sizeof *tokens) == 0 && fsync(fd) == 0;
    int e = errno;
    if (fd >= 0 && close(fd) != 0 && ok) {
        ok = 0;
        e = errno;
    }
    // Rename only a complete file so readers never see a half-written shard.
    if (ok && rename(tmp, path) != 0) {
        ok = 0;
        e = errno;
    }
    if (!ok && fd >= 0) unlink(tmp);
    free(tmp);
    if (!ok) {
        errno = e;
        return -1;
    }
    return 0;
}
