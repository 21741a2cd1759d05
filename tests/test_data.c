// test_data.c: shard validation, stream batching across shards and DP ranks, and the GPT-2
// decode table.
#include <criterion/criterion.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"
#include "data.h"
#include "testutil.h"
#include "tokenizer.h"

// ---- fixtures

// Writes dir/name holding tokens first, first+1, ..., first+count-1 (a "counting" shard whose
// token values are their stream positions, so a batch names the sequences it holds).
static void write_counting(char *path, size_t pathlen, const char *dir, const char *name,
                           size_t first, size_t count) {
    snprintf(path, pathlen, "%s/%s", dir, name);
    uint16_t *tok = malloc(count * sizeof *tok + 1);
    cr_assert_not_null(tok);
    for (size_t i = 0; i < count; i++) tok[i] = (uint16_t)(first + i);
    cr_assert_eq(data_write_shard(path, tok, count), 0, "data_write_shard(%s): %s", path,
                 strerror(errno));
    free(tok);
}

// Overwrites 4 bytes at a byte offset of an existing file.
static void poke_i32(const char *path, off_t offset, int32_t value) {
    int fd = open(path, O_WRONLY);
    cr_assert(fd >= 0, "open %s", path);
    cr_assert_eq(pwrite(fd, &value, sizeof value, offset), (ssize_t)sizeof value);
    close(fd);
}

static void assert_closed(const struct data_loader *dl) {
    cr_assert_null(dl->shards, "a failed open must leave no shards behind");
    cr_assert_eq(dl->n_shards, 0);
    cr_assert_null(dl->inputs);
    cr_assert_null(dl->targets);
}

// Opens with expected failure and checks the message is one line mentioning each needle.
static void expect_open_error(const char *pattern, int B, int T, int dp_rank, int dp_size,
                              int vocab, const char *needle1, const char *needle2) {
    struct data_loader dl;
    char err[1024] = "";
    int rc = data_open(&dl, pattern, B, T, dp_rank, dp_size, vocab, err, sizeof err);
    cr_assert_eq(rc, TP_EXIT_USAGE, "rc %d for %s (err: %s)", rc, pattern, err);
    cr_assert_null(strchr(err, '\n'), "error must be one line: %s", err);
    cr_assert(strstr(err, needle1), "error lacks '%s': %s", needle1, err);
    if (needle2) cr_assert(strstr(err, needle2), "error lacks '%s': %s", needle2, err);
    assert_closed(&dl);
}

// First token of each sequence of the current micro-batch, i.e. the sequence starts when the
// stream is a counting stream.
static void batch_starts(const struct data_loader *dl, int *out) {
    for (int j = 0; j < dl->B; j++) out[j] = dl->inputs[(size_t)j * (size_t)dl->T];
}

// ---- one shard

Test(data, good_shard_first_batches) {
    char dir[512], path[1024], err[1024] = "";
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "one.bin", 0, 100);
    struct data_loader dl;
    int B = 2, T = 8;
    cr_assert_eq(data_open(&dl, path, B, T, 0, 1, 1000, err, sizeof err), 0, "%s", err);
    cr_assert_eq(dl.n_shards, 1);
    cr_assert_eq(dl.total_tokens, 100);
    cr_assert_eq(dl.n_seqs, 99 / 8);
    cr_assert_eq(data_batches_per_epoch(&dl), 12 / 2);
    for (int batch = 0; batch < 2; batch++) {
        cr_assert_eq(data_next(&dl, err, sizeof err), 0, "%s", err);
        for (int j = 0; j < B; j++)
            for (int t = 0; t < T; t++) {
                int want = (batch * B + j) * T + t;
                cr_assert_eq(dl.inputs[j * T + t], want, "batch %d row %d t %d", batch, j, t);
                cr_assert_eq(dl.targets[j * T + t], want + 1, "batch %d row %d t %d", batch, j, t);
            }
    }
    cr_assert_eq(dl.position, 2);
    data_close(&dl);
    assert_closed(&dl);
    data_close(&dl); // closing twice is harmless
    tu_rmtree(dir);
}

Test(data, write_shard_is_atomic_and_reports_errors) {
    char dir[512], path[1024], tmp[1100];
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "a.bin", 7, 3);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    cr_assert_neq(access(tmp, F_OK), 0, "the temporary file must be renamed away");
    struct stat st;
    cr_assert_eq(stat(path, &st), 0);
    cr_assert_eq(st.st_size, 1024 + 3 * 2);
    FILE *f = fopen(path, "rb");
    int32_t header[256];
    uint16_t tok[3];
    cr_assert_eq(fread(header, sizeof header, 1, f), 1);
    cr_assert_eq(fread(tok, sizeof tok, 1, f), 1);
    fclose(f);
    cr_assert_eq(header[0], 20240520);
    cr_assert_eq(header[1], 1);
    cr_assert_eq(header[2], 3);
    cr_assert_eq(header[3], 0);
    cr_assert_eq(tok[0], 7);
    cr_assert_eq(tok[2], 9);

    char bad[1100];
    snprintf(bad, sizeof bad, "%s/no/such/dir/x.bin", dir);
    errno = 0;
    cr_assert_eq(data_write_shard(bad, tok, 3), -1);
    cr_assert_eq(errno, ENOENT);
    tu_rmtree(dir);
}

Test(data, shipped_val_shard_reads_a_full_epoch) {
    char path[1024], err[1024] = "";
    snprintf(path, sizeof path, "%s/data/tinyshakespeare_val.bin", tu_source_root());
    struct data_loader dl;
    cr_assert_eq(data_open(&dl, path, 4, 64, 0, 1, 50257, err, sizeof err), 0, "%s", err);
    cr_assert_eq(dl.total_tokens, 32768);
    size_t n = data_batches_per_epoch(&dl);
    cr_assert_eq(n, (32767 / 64) / 4);
    for (size_t i = 0; i < n; i++) cr_assert_eq(data_next(&dl, err, sizeof err), 0, "%s", err);
    data_close(&dl);
}

// ---- validation errors

Test(data, bad_magic) {
    char dir[512], path[1024];
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "m.bin", 0, 50);
    poke_i32(path, 0, 12345);
    expect_open_error(path, 1, 4, 0, 1, 1000, path, "bad magic 12345 (expected 20240520)");
    expect_open_error(path, 1, 4, 0, 1, 1000, "not a tptrain/llm.c token shard", NULL);
    tu_rmtree(dir);
}

Test(data, bad_version) {
    char dir[512], path[1024];
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "v.bin", 0, 50);
    poke_i32(path, 4, 7);
    expect_open_error(path, 1, 4, 0, 1, 1000, path, "version 7 (expected 1)");
    tu_rmtree(dir);
}

Test(data, truncated_tokens) {
    char dir[512], path[1024];
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "t.bin", 0, 100);
    cr_assert_eq(truncate(path, 1024 + 2 * 50), 0);
    expect_open_error(path, 1, 4, 0, 1, 1000, path,
                      "truncated or padded: header says 100 tokens (1224 bytes) but the file has "
                      "1124 bytes");
    tu_rmtree(dir);
}

Test(data, padded_tokens) {
    char dir[512], path[1024];
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "p.bin", 0, 100);
    cr_assert_eq(truncate(path, 1024 + 2 * 100 + 1), 0);
    expect_open_error(path, 1, 4, 0, 1, 1000, path, "(1224 bytes) but the file has 1225 bytes");
    tu_rmtree(dir);
}

Test(data, truncated_header) {
    char dir[512], path[1024];
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "h.bin", 0, 100);
    cr_assert_eq(truncate(path, 812), 0);
    expect_open_error(path, 1, 4, 0, 1, 1000, path, "truncated header: 812 bytes");
    expect_open_error(path, 1, 4, 0, 1, 1000, "1024-byte header", "scripts/prepare_data.py");
    tu_rmtree(dir);
}

Test(data, bad_shard_among_good_ones_leaks_nothing) {
    char dir[512], path[1024], pattern[1024];
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "s_0.bin", 0, 100);
    write_counting(path, sizeof path, dir, "s_1.bin", 100, 100);
    poke_i32(path, 0, 1);
    snprintf(pattern, sizeof pattern, "%s/s_*.bin", dir);
    expect_open_error(pattern, 1, 4, 0, 1, 1000, path, "bad magic 1");
    tu_rmtree(dir);
}

Test(data, no_match) {
    char dir[512], pattern[1024];
    tu_tmpdir(dir, sizeof dir, "data");
    snprintf(pattern, sizeof pattern, "%s/none_*.bin", dir);
    expect_open_error(pattern, 1, 4, 0, 1, 1000, pattern, "no file matches");
    tu_rmtree(dir);
}

Test(data, stream_too_short) {
    char dir[512], path[1024];
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "e.bin", 0, 0);
    expect_open_error(path, 1, 4, 0, 1, 1000, path, "0 tokens");
    write_counting(path, sizeof path, dir, "e.bin", 0, 8);
    expect_open_error(path, 1, 8, 0, 1, 1000, "seq_len+1 = 9", NULL);
    tu_rmtree(dir);
}

Test(data, fewer_sequences_than_one_micro_batch_per_rank) {
    char dir[512], path[1024], err[1024];
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "f.bin", 0, 4 * 6 + 1); // exactly 6 sequences of T=4
    expect_open_error(path, 4, 4, 1, 2, 1000, path, "needs 8");
    struct data_loader dl;
    cr_assert_eq(data_open(&dl, path, 3, 4, 1, 2, 1000, err, sizeof err), 0, "%s", err);
    cr_assert_eq(data_batches_per_epoch(&dl), 1);
    data_close(&dl);
    tu_rmtree(dir);
}

Test(data, bad_arguments) {
    char dir[512], path[1024];
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "a.bin", 0, 100);
    expect_open_error(path, 0, 4, 0, 1, 1000, "must be positive", NULL);
    expect_open_error(path, 1, 4, 2, 2, 1000, "DP rank 2", NULL);
    expect_open_error(path, 1, 4, 0, 1, 0, "vocab_size 0", NULL);
    tu_rmtree(dir);
}

// ---- several shards, DP slicing

Test(data, glob_three_shards_sorted_with_crossing_sequence) {
    char dir[512], path[1024], pattern[1024], err[1024] = "";
    tu_tmpdir(dir, sizeof dir, "data");
    // Written out of order so only sorting puts them back as 0, 10, 17.
    write_counting(path, sizeof path, dir, "shard_002.bin", 17, 13);
    write_counting(path, sizeof path, dir, "shard_000.bin", 0, 10);
    write_counting(path, sizeof path, dir, "shard_001.bin", 10, 7);
    snprintf(pattern, sizeof pattern, "%s/shard_*.bin", dir);
    struct data_loader dl;
    int T = 4;
    cr_assert_eq(data_open(&dl, pattern, 1, T, 0, 1, 1000, err, sizeof err), 0, "%s", err);
    cr_assert_eq(dl.n_shards, 3);
    cr_assert_eq(dl.total_tokens, 30);
    cr_assert_eq(dl.n_seqs, 29 / 4);
    cr_assert(strstr(dl.shards[1].path, "shard_001.bin"));
    // Sequence 2 is tokens 8..12 (crosses 0 -> 1); sequence 4 is 16..20 (crosses 1 -> 2).
    for (size_t s = 0; s < dl.n_seqs; s++) {
        cr_assert_eq(data_next(&dl, err, sizeof err), 0, "%s", err);
        for (int t = 0; t < T; t++) {
            cr_assert_eq(dl.inputs[t], (int)(s * T) + t, "seq %zu t %d", s, t);
            cr_assert_eq(dl.targets[t], (int)(s * T) + t + 1, "seq %zu t %d", s, t);
        }
    }
    data_close(&dl);
    tu_rmtree(dir);
}

Test(data, empty_shard_in_the_middle_is_skipped) {
    char dir[512], path[1024], pattern[1024], err[1024] = "";
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "x_0.bin", 0, 6);
    write_counting(path, sizeof path, dir, "x_1.bin", 0, 0);
    write_counting(path, sizeof path, dir, "x_2.bin", 6, 6);
    snprintf(pattern, sizeof pattern, "%s/x_*.bin", dir);
    struct data_loader dl;
    cr_assert_eq(data_open(&dl, pattern, 1, 8, 0, 1, 1000, err, sizeof err), 0, "%s", err);
    cr_assert_eq(data_next(&dl, err, sizeof err), 0, "%s", err);
    for (int t = 0; t < 8; t++) {
        cr_assert_eq(dl.inputs[t], t);
        cr_assert_eq(dl.targets[t], t + 1);
    }
    data_close(&dl);
    tu_rmtree(dir);
}

// Opens the counting stream at `pattern` for one DP rank.
static void open_rank(struct data_loader *dl, const char *pattern, int B, int T, int d, int D) {
    char err[1024] = "";
    cr_assert_eq(data_open(dl, pattern, B, T, d, D, 65536, err, sizeof err), 0, "%s", err);
}

Test(data, dp_slices_are_disjoint_and_match_grad_accumulation) {
    char dir[512], path[1024], pattern[1024], err[1024] = "";
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "d_0.bin", 0, 500);
    write_counting(path, sizeof path, dir, "d_1.bin", 500, 333);
    snprintf(pattern, sizeof pattern, "%s/d_*.bin", dir);
    enum { B = 3, T = 5 };
    struct data_loader one, r0, r1;
    open_rank(&one, pattern, B, T, 0, 1);
    open_rank(&r0, pattern, B, T, 0, 2);
    open_rank(&r1, pattern, B, T, 1, 2);
    size_t steps = data_batches_per_epoch(&r0);
    cr_assert_eq(steps, (832 / 5) / (2 * B));
    cr_assert_eq(data_batches_per_epoch(&r1), steps);
    for (size_t s = 0; s < steps; s++) {
        int a[2 * B], b[2 * B];
        // dp=1 micro-batches 2s and 2s+1 ...
        cr_assert_eq(data_next(&one, err, sizeof err), 0, "%s", err);
        batch_starts(&one, a);
        cr_assert_eq(data_next(&one, err, sizeof err), 0, "%s", err);
        batch_starts(&one, a + B);
        // ... hold what ranks 0 and 1 read at dp=2 step s, in the same order.
        cr_assert_eq(data_next(&r0, err, sizeof err), 0, "%s", err);
        cr_assert_eq(data_next(&r1, err, sizeof err), 0, "%s", err);
        batch_starts(&r0, b);
        batch_starts(&r1, b + B);
        for (int j = 0; j < 2 * B; j++) {
            cr_assert_eq(b[j], a[j], "step %zu slot %d", s, j);
            cr_assert_eq(a[j], (int)((2 * s * B + (size_t)j) * T), "sequences stay in order");
        }
        // Whole rows match too, not just their first token.
        cr_assert_eq(memcmp(r1.targets, one.targets, sizeof(int) * B * T), 0);
    }
    data_close(&one);
    data_close(&r0);
    data_close(&r1);
    tu_rmtree(dir);
}

Test(data, four_dp_ranks_cover_each_sequence_once_per_epoch) {
    char dir[512], path[1024], err[1024] = "";
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "q.bin", 0, 1001);
    enum { B = 2, T = 10, D = 4 };
    size_t n_seqs = 1000 / T;
    char *seen = calloc(n_seqs, 1);
    size_t steps = 0;
    for (int d = 0; d < D; d++) {
        struct data_loader dl;
        open_rank(&dl, path, B, T, d, D);
        steps = data_batches_per_epoch(&dl);
        cr_assert_eq(steps, n_seqs / (B * D));
        for (size_t s = 0; s < steps; s++) {
            cr_assert_eq(data_next(&dl, err, sizeof err), 0, "%s", err);
            int starts[B];
            batch_starts(&dl, starts);
            for (int j = 0; j < B; j++) {
                cr_assert_eq(starts[j] % T, 0);
                size_t seq = (size_t)starts[j] / T;
                cr_assert_lt(seq, n_seqs);
                cr_assert_eq(seen[seq], 0, "sequence %zu read twice (rank %d step %zu)", seq, d, s);
                seen[seq] = 1;
            }
        }
        data_close(&dl);
    }
    for (size_t i = 0; i < steps * B * D; i++) cr_assert_eq(seen[i], 1, "sequence %zu unread", i);
    free(seen);
    tu_rmtree(dir);
}

Test(data, wraps_after_an_epoch) {
    char dir[512], path[1024], err[1024] = "";
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "w.bin", 0, 200);
    struct data_loader dl;
    enum { B = 2, T = 7 };
    open_rank(&dl, path, B, T, 1, 3);
    size_t n = data_batches_per_epoch(&dl);
    cr_assert_eq(n, (199 / 7) / 6);
    int first[B * T], cur[B * T];
    cr_assert_eq(data_next(&dl, err, sizeof err), 0, "%s", err);
    memcpy(first, dl.inputs, sizeof first);
    cr_assert_eq(first[0], (0 * 3 + 1) * B * T, "rank 1 starts at its own block");
    for (size_t i = 1; i < n; i++) {
        cr_assert_eq(data_next(&dl, err, sizeof err), 0, "%s", err);
        cr_assert_neq(dl.inputs[0], first[0]);
    }
    cr_assert_eq(data_next(&dl, err, sizeof err), 0, "%s", err);
    memcpy(cur, dl.inputs, sizeof cur);
    cr_assert_eq(memcmp(cur, first, sizeof cur), 0, "epoch 2 starts where epoch 1 did");
    cr_assert_eq(dl.position, n + 1, "position keeps counting across epochs");
    data_close(&dl);
    tu_rmtree(dir);
}

Test(data, seek_repositions) {
    char dir[512], path[1024], err[1024] = "";
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "k.bin", 0, 400);
    struct data_loader dl;
    enum { B = 2, T = 6 };
    open_rank(&dl, path, B, T, 0, 2);
    int batches[6][B * T];
    for (int i = 0; i < 6; i++) {
        cr_assert_eq(data_next(&dl, err, sizeof err), 0, "%s", err);
        memcpy(batches[i], dl.targets, sizeof batches[i]);
    }
    data_seek(&dl, 3);
    cr_assert_eq(dl.position, 3);
    cr_assert_eq(data_next(&dl, err, sizeof err), 0, "%s", err);
    cr_assert_eq(memcmp(dl.targets, batches[3], sizeof batches[3]), 0);
    cr_assert_eq(dl.position, 4);
    data_seek(&dl, 0);
    cr_assert_eq(data_next(&dl, err, sizeof err), 0, "%s", err);
    cr_assert_eq(memcmp(dl.targets, batches[0], sizeof batches[0]), 0);
    // A position from a later epoch lands on the same micro-batch.
    data_seek(&dl, 2 * data_batches_per_epoch(&dl) + 5);
    cr_assert_eq(data_next(&dl, err, sizeof err), 0, "%s", err);
    cr_assert_eq(memcmp(dl.targets, batches[5], sizeof batches[5]), 0);
    data_close(&dl);
    tu_rmtree(dir);
}

Test(data, out_of_range_token_names_shard_and_offset) {
    char dir[512], path[1024], pattern[1024], err[1024] = "";
    tu_tmpdir(dir, sizeof dir, "data");
    write_counting(path, sizeof path, dir, "r_0.bin", 0, 40);
    snprintf(path, sizeof path, "%s/r_1.bin", dir);
    uint16_t tok[60];
    for (int i = 0; i < 60; i++) tok[i] = (uint16_t)(40 + i);
    tok[37] = 60000; // stream index 77
    cr_assert_eq(data_write_shard(path, tok, 60), 0);
    snprintf(pattern, sizeof pattern, "%s/r_*.bin", dir);
    struct data_loader dl;
    cr_assert_eq(data_open(&dl, pattern, 1, 10, 0, 1, 50257, err, sizeof err), 0, "%s", err);
    int rc = 0;
    size_t ok = 0;
    for (size_t i = 0; i < data_batches_per_epoch(&dl) && rc == 0; i++) {
        rc = data_next(&dl, err, sizeof err);
        if (rc == 0) ok++;
    }
    // Stream index 77 lies in sequence 7 (tokens 70..80): sequences 0..6 read cleanly.
    cr_assert_eq(ok, 7);
    cr_assert_eq(rc, TP_EXIT_USAGE);
    cr_assert(strstr(err, path), "error names the shard: %s", err);
    cr_assert(strstr(err, "token 60000 at byte offset 1098"), "%s", err); // 1024 + 2*37
    cr_assert(strstr(err, "vocab_size 50257"), "%s", err);
    cr_assert_null(strchr(err, '\n'));
    data_close(&dl);
    tu_rmtree(dir);
}

// ---- tokenizer

static void tokenizer_path(char *out, size_t outlen) {
    const char *root = getenv("TP_SOURCE_ROOT");
    cr_assert(root && *root, "TP_SOURCE_ROOT is not set");
    snprintf(out, outlen, "%s/data/gpt2_tokenizer.bin", root);
}

Test(data, tokenizer_decodes_gpt2) {
    char path[1024], err[1024] = "";
    tokenizer_path(path, sizeof path);
    struct tokenizer tk;
    cr_assert_eq(tokenizer_load(&tk, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(tk.vocab_size, 50257);
    cr_assert_eq(tk.eot, 50256);
    cr_assert_str_eq(tokenizer_decode(&tk, 198), "\n");
    cr_assert_str_eq(tokenizer_decode(&tk, 464), "The");
    cr_assert_eq(tk.lengths[464], 3);
    cr_assert_str_eq(tokenizer_decode(&tk, 50257), "");
    cr_assert_str_eq(tokenizer_decode(&tk, -1), "");
    tokenizer_free(&tk);
    cr_assert_null(tk.pieces);
}

// Copies the shipped tokenizer into dir, keeping only its first `keep` bytes (0 = all).
static void copy_tokenizer(char *out, size_t outlen, const char *dir, size_t keep) {
    char src[1024];
    tokenizer_path(src, sizeof src);
    FILE *in = fopen(src, "rb");
    cr_assert_not_null(in);
    snprintf(out, outlen, "%s/tok.bin", dir);
    FILE *o = fopen(out, "wb");
    cr_assert_not_null(o);
    char buf[4096];
    size_t n, total = 0;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) {
        if (keep && total + n > keep) n = keep - total;
        fwrite(buf, 1, n, o);
        total += n;
        if (keep && total == keep) break;
    }
    fclose(in);
    fclose(o);
}

static void expect_tokenizer_error(const char *path, const char *needle1, const char *needle2) {
    struct tokenizer tk;
    char err[1024] = "";
    cr_assert_eq(tokenizer_load(&tk, path, err, sizeof err), TP_EXIT_USAGE, "loaded %s", path);
    cr_assert_null(strchr(err, '\n'), "one line: %s", err);
    cr_assert(strstr(err, needle1), "error lacks '%s': %s", needle1, err);
    if (needle2) cr_assert(strstr(err, needle2), "error lacks '%s': %s", needle2, err);
    cr_assert_null(tk.pieces);
    cr_assert_eq(tk.vocab_size, 0);
}

Test(data, corrupted_tokenizer_is_rejected) {
    char dir[512], path[1024];
    tu_tmpdir(dir, sizeof dir, "data");
    copy_tokenizer(path, sizeof path, dir, 0);
    poke_i32(path, 0, 20240520); // a shard's magic, a plausible mix-up
    expect_tokenizer_error(path, path, "bad magic 20240520 (expected 20240328)");

    copy_tokenizer(path, sizeof path, dir, 0);
    poke_i32(path, 4, 1);
    expect_tokenizer_error(path, path, "version 1 (expected 2 or 3)");

    copy_tokenizer(path, sizeof path, dir, 100);
    expect_tokenizer_error(path, path, "truncated header");

    // Cut in the middle of the table: names where it ends.
    copy_tokenizer(path, sizeof path, dir, 5000);
    expect_tokenizer_error(path, path, "truncated at byte offset");

    char missing[1100];
    snprintf(missing, sizeof missing, "%s/absent.bin", dir);
    expect_tokenizer_error(missing, missing, "cannot open");
    tu_rmtree(dir);
}
