// test_safetensors.c: safetensors writer/reader round trips, interop with an independent Python
// reader and writer, and one-line errors for corrupted files.
#include <criterion/criterion.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "safetensors.h"
#include "testutil.h"

// ---- helpers

static char g_dir[1024];

static void setup(void) { tu_tmpdir(g_dir, sizeof g_dir, "st"); }
static void teardown(void) { tu_rmtree(g_dir); }

TestSuite(safetensors, .init = setup, .fini = teardown);

static void path_in(char *out, size_t len, const char *name) { snprintf(out, len, "%s/%s", g_dir, name); }

// Deterministic bytes so every tensor's content is distinct.
static void fill_bytes(void *dst, size_t n, unsigned seed) {
    unsigned char *p = dst;
    uint32_t x = 2463534242u ^ seed;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        p[i] = (unsigned char)x;
    }
}

// Writes an 8-byte length, the header text as given (no padding) and `data_bytes` bytes of data.
static void write_raw(const char *path, const char *header, size_t data_bytes) {
    FILE *f = fopen(path, "wb");
    cr_assert(f, "cannot create %s", path);
    uint64_t n = strlen(header);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)(n >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(header, 1, n, f);
    for (size_t i = 0; i < data_bytes; i++) fputc((int)(i & 0xFF), f);
    fclose(f);
}

// Opens a file expected to be bad: checks the exit code, that the message is one line naming the
// file, and that it contains `want` (and `tensor` if given).
static void expect_bad(const char *path, const char *tensor, const char *want) {
    struct st_file f;
    char err[1024] = "";
    int rc = st_open(&f, path, err, sizeof err);
    cr_assert_eq(rc, TP_EXIT_USAGE, "expected a usage error for %s, got rc %d (%s)", path, rc, err);
    cr_assert(strstr(err, path) == err, "message does not start with the file name: %s", err);
    cr_assert_null(strchr(err, '\n'), "message is not one line: %s", err);
    if (tensor) {
        char quoted[256];
        snprintf(quoted, sizeof quoted, "tensor '%s'", tensor);
        cr_assert(strstr(err, quoted), "message does not name %s: %s", quoted, err);
    }
    cr_assert(strstr(err, want), "message lacks \"%s\": %s", want, err);
    cr_assert_null(f.map, "a failed open must leave nothing mapped");
    st_close(&f);
}

// The set of tensors used by the round-trip tests: every dtype, 0 to 4 dimensions, an empty one,
// and names that need JSON escaping.
struct spec {
    const char *name;
    enum st_dtype dtype;
    int ndim;
    int64_t shape[4];
};

static const struct spec k_specs[] = {
    {"wte.weight", ST_F32, 2, {5, 3}},
    {"h.0.ln_1.bias", ST_BF16, 1, {7}},
    {"h.0.attn.bias", ST_F16, 4, {1, 1, 3, 3}},
    {"ids", ST_I32, 3, {2, 1, 3}},
    {"step", ST_I64, 0, {0}},
    {"empty", ST_F32, 2, {0, 4}},
    {"quote\"back\\slash\ttab/\xc3\xa9", ST_I64, 1, {2}},
};
#define N_SPECS (sizeof k_specs / sizeof k_specs[0])

static size_t spec_bytes(const struct spec *s) {
    size_t n = st_dtype_size(s->dtype);
    for (int d = 0; d < s->ndim; d++) n *= (size_t)s->shape[d];
    return n;
}

// Writes k_specs to path with metadata; returns the data of each tensor in bufs (caller frees).
static void write_specs(const char *path, void *bufs[N_SPECS]) {
    char err[512];
    struct st_writer *w = st_writer_new(path);
    for (size_t i = 0; i < N_SPECS; i++) {
        const struct spec *s = &k_specs[i];
        cr_assert_eq(st_writer_add(w, s->name, s->dtype, s->ndim, s->shape, err, sizeof err), 0, "%s", err);
    }
    cr_assert_eq(st_writer_add_metadata(w, "format", "pt", err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_add_metadata(w, "config", "{\"n_layer\": 2}\nline2", err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_begin(w, err, sizeof err), 0, "%s", err);
    for (size_t i = 0; i < N_SPECS; i++) {
        size_t bytes = spec_bytes(&k_specs[i]);
        bufs[i] = malloc(bytes ? bytes : 1);
        fill_bytes(bufs[i], bytes, (unsigned)i + 1);
        // Alternate between naming the tensor and letting the writer take the next one.
        const char *name = i % 2 ? NULL : k_specs[i].name;
        cr_assert_eq(st_writer_write(w, name, bufs[i], bytes, err, sizeof err), 0, "%s", err);
    }
    cr_assert_eq(st_writer_finish(w, err, sizeof err), 0, "%s", err);
    st_writer_free(w);
}

static long file_size(const char *path) {
    FILE *f = fopen(path, "rb");
    cr_assert(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fclose(f);
    return n;
}

// ---- round trips

Test(safetensors, round_trip_dtypes_shapes_metadata) {
    char path[1100], err[512];
    path_in(path, sizeof path, "rt.safetensors");
    void *bufs[N_SPECS];
    write_specs(path, bufs);

    struct st_file f;
    cr_assert_eq(st_open(&f, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(f.n_tensors, (int)N_SPECS);
    cr_assert_eq(f.header_bytes % 8, 0, "header must be padded to a multiple of 8");
    size_t total = 0;
    for (size_t i = 0; i < N_SPECS; i++) {
        const struct spec *s = &k_specs[i];
        const struct st_tensor *t = &f.tensors[i];
        cr_assert_str_eq(t->name, s->name, "iteration keeps declaration order");
        cr_assert_eq(st_find(&f, s->name), t, "lookup of %s", s->name);
        cr_assert_eq(t->dtype, s->dtype, "%s dtype", s->name);
        cr_assert_eq(t->ndim, s->ndim, "%s ndim", s->name);
        size_t numel = 1;
        for (int d = 0; d < s->ndim; d++) {
            cr_assert_eq(t->shape[d], s->shape[d], "%s dim %d", s->name, d);
            numel *= (size_t)s->shape[d];
        }
        cr_assert_eq(t->numel, numel, "%s numel", s->name);
        size_t bytes = spec_bytes(s);
        cr_assert_eq(t->end - t->begin, bytes, "%s bytes", s->name);
        cr_assert_eq(t->begin, total, "%s is stored right after the previous tensor", s->name);
        cr_assert_eq(memcmp(t->data, bufs[i], bytes), 0, "%s contents differ", s->name);
        total += bytes;
        free(bufs[i]);
    }
    cr_assert_eq(f.data_bytes, total);
    cr_assert_eq((long)(8 + f.header_bytes + f.data_bytes), file_size(path));
    cr_assert_null(st_find(&f, "missing"));
    cr_assert_null(st_find(&f, "wte"));
    cr_assert_eq(f.n_meta, 2);
    cr_assert_str_eq(st_metadata(&f, "format"), "pt");
    cr_assert_str_eq(st_metadata(&f, "config"), "{\"n_layer\": 2}\nline2");
    cr_assert_null(st_metadata(&f, "absent"));
    st_close(&f);
    st_close(&f); // closing twice is harmless
}

Test(safetensors, write_in_parts_and_empty_file) {
    char path[1100], err[512];
    path_in(path, sizeof path, "parts.safetensors");
    float a[6 * 4];    // (6, 4)
    int32_t b[3];      // (3)
    fill_bytes(a, sizeof a, 11);
    fill_bytes(b, sizeof b, 12);
    struct st_writer *w = st_writer_new(path);
    cr_assert_eq(st_writer_add(w, "a", ST_F32, 2, (int64_t[]){6, 4}, err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_add(w, "b", ST_I32, 1, (int64_t[]){3}, err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_begin(w, err, sizeof err), 0, "%s", err);
    // Row blocks of 2, 3 and 1 rows, as a gather of uneven shards would deliver them.
    cr_assert_eq(st_writer_write_part(w, "a", a, 2 * 4 * sizeof(float), err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_write_part(w, "a", a + 8, 3 * 4 * sizeof(float), err, sizeof err), 0, "%s", err);
    // A part larger than what is left of the tensor is refused.
    cr_assert_eq(st_writer_write_part(w, "a", a + 20, 2 * 4 * sizeof(float), err, sizeof err), TP_EXIT_USAGE);
    cr_assert(strstr(err, "overruns"), "%s", err);
    cr_assert_eq(st_writer_write_part(w, NULL, a + 20, 4 * sizeof(float), err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_write(w, "b", b, sizeof b, err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_finish(w, err, sizeof err), 0, "%s", err);
    st_writer_free(w);

    struct st_file f;
    cr_assert_eq(st_open(&f, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(memcmp(st_find(&f, "a")->data, a, sizeof a), 0);
    cr_assert_eq(memcmp(st_find(&f, "b")->data, b, sizeof b), 0);
    st_close(&f);

    // A file with no tensors at all is valid: "{}" padded to 8 bytes.
    path_in(path, sizeof path, "empty.safetensors");
    w = st_writer_new(path);
    cr_assert_eq(st_writer_begin(w, err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_finish(w, err, sizeof err), 0, "%s", err);
    st_writer_free(w);
    cr_assert_eq(file_size(path), 16);
    cr_assert_eq(st_open(&f, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(f.n_tensors, 0);
    cr_assert_null(st_find(&f, "a"));
    st_close(&f);
}

Test(safetensors, read_f32_converts_bf16_and_f16) {
    char path[1100], err[512];
    path_in(path, sizeof path, "conv.safetensors");
    // bf16: 1.0, -2.5, 0x4049 = 3.140625; f16: 1, 65504 (max), 2^-24 (smallest subnormal), -0, inf,
    // 0x0200 = 2^-15 (subnormal), 0x3555 = 0.333251953125
    uint16_t bf[3] = {0x3F80, 0xC020, 0x4049};
    uint16_t hf[7] = {0x3C00, 0x7BFF, 0x0001, 0x8000, 0x7C00, 0x0200, 0x3555};
    float f32[2] = {0.5f, -7.25f};
    int32_t i32[1] = {42};
    struct st_writer *w = st_writer_new(path);
    cr_assert_eq(st_writer_add(w, "bf", ST_BF16, 1, (int64_t[]){3}, err, sizeof err), 0);
    cr_assert_eq(st_writer_add(w, "hf", ST_F16, 1, (int64_t[]){7}, err, sizeof err), 0);
    cr_assert_eq(st_writer_add(w, "f32", ST_F32, 1, (int64_t[]){2}, err, sizeof err), 0);
    cr_assert_eq(st_writer_add(w, "i32", ST_I32, 1, (int64_t[]){1}, err, sizeof err), 0);
    cr_assert_eq(st_writer_begin(w, err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_write(w, "bf", bf, sizeof bf, err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_write(w, "hf", hf, sizeof hf, err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_write(w, "f32", f32, sizeof f32, err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_write(w, "i32", i32, sizeof i32, err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_finish(w, err, sizeof err), 0, "%s", err);
    st_writer_free(w);

    struct st_file f;
    cr_assert_eq(st_open(&f, path, err, sizeof err), 0, "%s", err);
    float out[7];
    cr_assert_eq(st_read_f32(&f, st_find(&f, "bf"), out, 0, 3, err, sizeof err), 0, "%s", err);
    cr_assert_eq(out[0], 1.0f);
    cr_assert_eq(out[1], -2.5f);
    cr_assert_eq(out[2], 3.140625f);
    cr_assert_eq(st_read_f32(&f, st_find(&f, "hf"), out, 0, 7, err, sizeof err), 0, "%s", err);
    cr_assert_eq(out[0], 1.0f);
    cr_assert_eq(out[1], 65504.0f);
    cr_assert_eq(out[2], 0x1p-24f);
    cr_assert_eq(out[3], 0.0f);
    cr_assert(signbit(out[3]), "-0 keeps its sign");
    cr_assert(isinf(out[4]) && out[4] > 0);
    cr_assert_eq(out[5], 0x1p-15f);
    cr_assert_eq(out[6], 0.333251953125f);
    // A sub-range (as a rank loading its shard would ask for).
    cr_assert_eq(st_read_f32(&f, st_find(&f, "f32"), out, 1, 1, err, sizeof err), 0, "%s", err);
    cr_assert_eq(out[0], -7.25f);
    cr_assert_eq(st_read_f32(&f, st_find(&f, "f32"), out, 1, 2, err, sizeof err), TP_EXIT_USAGE);
    cr_assert(strstr(err, "tensor 'f32'"), "%s", err);
    cr_assert_eq(st_read_f32(&f, st_find(&f, "i32"), out, 0, 1, err, sizeof err), TP_EXIT_USAGE);
    cr_assert(strstr(err, "I32"), "%s", err);
    st_close(&f);
}

// ---- writer misuse and I/O errors

Test(safetensors, writer_rejects_misuse) {
    char path[1100], err[512];
    path_in(path, sizeof path, "misuse.safetensors");
    float x[4] = {0};
    struct st_writer *w = st_writer_new(path);
    cr_assert_eq(st_writer_add(w, "a", ST_F32, 1, (int64_t[]){4}, err, sizeof err), 0);
    cr_assert_eq(st_writer_add(w, "b", ST_F32, 1, (int64_t[]){2}, err, sizeof err), 0);
    cr_assert_eq(st_writer_add(w, "a", ST_F32, 1, (int64_t[]){4}, err, sizeof err), TP_EXIT_USAGE);
    cr_assert(strstr(err, "'a' declared twice"), "%s", err);
    cr_assert_eq(st_writer_add(w, "__metadata__", ST_F32, 1, (int64_t[]){4}, err, sizeof err), TP_EXIT_USAGE);
    cr_assert_eq(st_writer_add(w, "neg", ST_F32, 1, (int64_t[]){-1}, err, sizeof err), TP_EXIT_USAGE);
    cr_assert_eq(st_writer_add(w, "deep", ST_F32, ST_MAX_DIMS + 1, (int64_t[ST_MAX_DIMS + 1]){0}, err,
                               sizeof err), TP_EXIT_USAGE);
    cr_assert_eq(st_writer_add_metadata(w, "k", "v", err, sizeof err), 0);
    cr_assert_eq(st_writer_add_metadata(w, "k", "w", err, sizeof err), TP_EXIT_USAGE);
    cr_assert_eq(st_writer_write(w, "a", x, sizeof x, err, sizeof err), TP_EXIT_USAGE);
    cr_assert(strstr(err, "before st_writer_begin"), "%s", err);
    cr_assert_eq(st_writer_begin(w, err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_add(w, "late", ST_F32, 1, (int64_t[]){1}, err, sizeof err), TP_EXIT_USAGE);
    cr_assert_eq(st_writer_write(w, "b", x, 2 * sizeof(float), err, sizeof err), TP_EXIT_USAGE);
    cr_assert(strstr(err, "'b' written out of order") && strstr(err, "'a'"), "%s", err);
    cr_assert_eq(st_writer_write(w, "a", x, 3 * sizeof(float), err, sizeof err), TP_EXIT_USAGE);
    cr_assert(strstr(err, "12 bytes written but it holds 16"), "%s", err);
    cr_assert_eq(st_writer_write(w, "a", x, sizeof x, err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_finish(w, err, sizeof err), TP_EXIT_USAGE);
    cr_assert(strstr(err, path) && strstr(err, "'b' incomplete"), "%s", err);
    st_writer_free(w);
}

Test(safetensors, writer_reports_io_errors_with_path_and_reason) {
    char path[1100], err[512];
    path_in(path, sizeof path, "no/such/dir/x.safetensors");
    struct st_writer *w = st_writer_new(path);
    cr_assert_eq(st_writer_add(w, "a", ST_F32, 1, (int64_t[]){1}, err, sizeof err), 0);
    cr_assert_eq(st_writer_begin(w, err, sizeof err), TP_EXIT_RUNTIME);
    cr_assert(strstr(err, path) && strstr(err, "No such file or directory"), "%s", err);
    // The failure sticks: later calls repeat it instead of writing into nothing.
    float one = 1.0f;
    cr_assert_eq(st_writer_write(w, "a", &one, sizeof one, err, sizeof err), TP_EXIT_RUNTIME);
    cr_assert(strstr(err, "No such file or directory"), "%s", err);
    cr_assert_eq(st_writer_finish(w, err, sizeof err), TP_EXIT_RUNTIME);
    st_writer_free(w);

    // A full device: writes to /dev/full fail at flush time at the latest.
    if (access("/dev/full", W_OK) == 0) {
        w = st_writer_new("/dev/full");
        static float big[1 << 16]; // larger than any stdio buffer
        cr_assert_eq(st_writer_add(w, "big", ST_F32, 1, (int64_t[]){1 << 16}, err, sizeof err), 0);
        int rc = st_writer_begin(w, err, sizeof err);
        if (rc == 0) rc = st_writer_write(w, "big", big, sizeof big, err, sizeof err);
        if (rc == 0) rc = st_writer_finish(w, err, sizeof err);
        cr_assert_eq(rc, TP_EXIT_RUNTIME);
        cr_assert(strstr(err, "/dev/full") && strstr(err, "No space left on device"), "%s", err);
        st_writer_free(w);
    }
}

// ---- interop with independent Python code (json + struct only)

static bool have_python(void) {
    char out[256];
    return tu_run(out, sizeof out, "command -v python3") == 0;
}

Test(safetensors, python_reader_agrees) {
    if (!have_python()) cr_skip_test("python3 not found: cannot cross-check with scripts/check_safetensors.py");
    char path[1100], raw[1100], err[512];
    path_in(path, sizeof path, "py.safetensors");
    void *bufs[N_SPECS];
    write_specs(path, bufs);

    static char out[16384];
    int rc = tu_run(out, sizeof out, "python3 '%s/scripts/check_safetensors.py' '%s'", tu_source_root(), path);
    cr_assert_eq(rc, 0, "check_safetensors.py rejected our file:\n%s", out);
    cr_assert(strstr(out, "# __metadata__ {\"config\": \"{\\\"n_layer\\\": 2}\\nline2\", \"format\": \"pt\"}"),
              "metadata not seen by Python:\n%s", out);

    // Expected line per tensor; the checksum comes from sha256sum over the raw bytes we wrote.
    for (size_t i = 0; i < N_SPECS; i++) {
        const struct spec *s = &k_specs[i];
        path_in(raw, sizeof raw, "raw.bin");
        FILE *fr = fopen(raw, "wb");
        cr_assert(fr);
        fwrite(bufs[i], 1, spec_bytes(s), fr);
        fclose(fr);
        char sum[256];
        cr_assert_eq(tu_run(sum, sizeof sum, "sha256sum '%s'", raw), 0, "%s", sum);
        sum[64] = '\0';
        char dims[128] = "[";
        for (int d = 0; d < s->ndim; d++)
            snprintf(dims + strlen(dims), sizeof dims - strlen(dims), "%s%lld", d ? "," : "", (long long)s->shape[d]);
        strcat(dims, "]");
        char line[512];
        snprintf(line, sizeof line, "%s %s %s %s\n", s->name, st_dtype_name(s->dtype), dims, sum);
        cr_assert(strstr(out, line), "Python output lacks \"%s\":\n%s", line, out);
        free(bufs[i]);
    }

    // And Python rejects what we reject.
    path_in(path, sizeof path, "bad.safetensors");
    write_raw(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                    "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12);
    rc = tu_run(out, sizeof out, "python3 '%s/scripts/check_safetensors.py' '%s'", tu_source_root(), path);
    cr_assert_eq(rc, 1, "check_safetensors.py accepted an overlapping file:\n%s", out);
    cr_assert(strstr(out, path) && strstr(out, "overlap"), "%s", out);
    (void)err;
}

// A file written by an independent writer, in a shape ours never produces: tensors listed out of
// data order, whitespace and \u escapes in the JSON, metadata last, unknown extra fields.
Test(safetensors, reads_file_from_independent_writer) {
    if (!have_python()) cr_skip_test("python3 not found: cannot write the foreign file");
    char path[1100], script[1100], err[512], out[4096];
    path_in(path, sizeof path, "foreign.safetensors");
    static const char py[] =
        "import json, struct, sys\n"
        "a = struct.pack('<4f', 1.0, 2.0, 3.0, 4.0)\n"
        "b = struct.pack('<3q', -1, 0, 1 << 40)\n"
        "hdr = ('{ \"b\\\\u00e9\" : {\"shape\": [3], \"dtype\": \"I64\", \"data_offsets\": [16, 40],'\n"
        "       ' \"extra\": [1, {\"x\": null}, -2.5e3, true]},\\n'\n"
        "       '  \"a\": {\"dtype\": \"F32\", \"data_offsets\": [0, 16], \"shape\": [2, 2]},'\n"
        "       '  \"__metadata__\": {\"who\": \"py\\\\tthon\"} }').encode()\n"
        "hdr += b' ' * (-len(hdr) % 8)\n"
        "open(sys.argv[1], 'wb').write(struct.pack('<Q', len(hdr)) + hdr + a + b)\n";
    tu_write_file(script, sizeof script, g_dir, "write.py", py);
    int rc = tu_run(out, sizeof out, "python3 '%s' '%s'", script, path);
    cr_assert_eq(rc, 0, "writer script failed:\n%s", out);

    struct st_file f;
    cr_assert_eq(st_open(&f, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(f.n_tensors, 2);
    cr_assert_str_eq(f.tensors[0].name, "b\xc3\xa9", "\\u00e9 decodes to UTF-8");
    cr_assert_str_eq(f.tensors[1].name, "a");
    const struct st_tensor *a = st_find(&f, "a");
    cr_assert(a && a->ndim == 2 && a->shape[0] == 2 && a->shape[1] == 2 && a->dtype == ST_F32);
    float av[4];
    memcpy(av, a->data, sizeof av);
    cr_assert(av[0] == 1.0f && av[3] == 4.0f);
    const struct st_tensor *b = st_find(&f, "b\xc3\xa9");
    cr_assert(b && b->dtype == ST_I64 && b->numel == 3 && b->begin == 16);
    int64_t bv[3];
    memcpy(bv, b->data, sizeof bv);
    cr_assert(bv[0] == -1 && bv[1] == 0 && bv[2] == (int64_t)1 << 40);
    cr_assert_str_eq(st_metadata(&f, "who"), "py\tthon");
    st_close(&f);
}

// ---- corrupted files

Test(safetensors, truncated_data_names_the_last_tensor) {
    char path[1100];
    path_in(path, sizeof path, "trunc.safetensors");
    void *bufs[N_SPECS];
    write_specs(path, bufs);
    for (size_t i = 0; i < N_SPECS; i++) free(bufs[i]);
    long size = file_size(path);
    cr_assert_eq(truncate(path, size - 3), 0);
    expect_bad(path, k_specs[N_SPECS - 1].name, "run past the end of the data area");
}

static unsigned char *slurp(const char *path, size_t *size) {
    *size = (size_t)file_size(path);
    unsigned char *buf = malloc(*size);
    FILE *fp = fopen(path, "rb");
    cr_assert(fp && fread(buf, 1, *size, fp) == *size);
    fclose(fp);
    return buf;
}

static void spit(const char *path, const unsigned char *buf, size_t size) {
    FILE *fp = fopen(path, "wb");
    cr_assert(fp && fwrite(buf, 1, size, fp) == size);
    fclose(fp);
}

Test(safetensors, truncation_at_any_length_is_an_error) {
    char path[1100], err[1024];
    path_in(path, sizeof path, "cut.safetensors");
    void *bufs[N_SPECS];
    write_specs(path, bufs);
    for (size_t i = 0; i < N_SPECS; i++) free(bufs[i]);
    size_t size;
    unsigned char *orig = slurp(path, &size);
    for (size_t len = 0; len < size; len++) {
        spit(path, orig, len);
        struct st_file f;
        int rc = st_open(&f, path, err, sizeof err);
        cr_assert_eq(rc, TP_EXIT_USAGE, "a file cut to %zu of %zu bytes was accepted", len, size);
        cr_assert(strstr(err, path) == err && !strchr(err, '\n'), "bad message at %zu: %s", len, err);
    }
    free(orig);
}

Test(safetensors, header_length_beyond_the_file) {
    char path[1100];
    path_in(path, sizeof path, "hlen.safetensors");
    FILE *f = fopen(path, "wb");
    unsigned char len8[8] = {0x00, 0x10, 0, 0, 0, 0, 0, 0}; // 4096
    fwrite(len8, 1, 8, f);
    fputs("{}      ", f);
    fclose(f);
    expect_bad(path, NULL, "header length 4096 is larger than the 8 bytes that follow it");

    write_raw(path, "", 0);
    expect_bad(path, NULL, "header length 0 is implausible");
    cr_assert_eq(truncate(path, 5), 0);
    expect_bad(path, NULL, "too short");
}

Test(safetensors, header_lying_about_offsets) {
    char path[1100];
    path_in(path, sizeof path, "model.safetensors");
    write_raw(path, "{\"h.0.attn.c_attn.weight\":{\"dtype\":\"F32\",\"shape\":[768,2304],\"data_offsets\":[0,100]}}",
              100);
    expect_bad(path, "h.0.attn.c_attn.weight",
               "data_offsets [0, 100] hold 100 bytes but F32 shape [768, 2304] needs 7077888");

    write_raw(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8);
    expect_bad(path, "a", "end before they begin");

    // Right size, but past the data area.
    write_raw(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 8);
    expect_bad(path, "a", "[8, 16] run past the end of the data area (8 bytes)");

    // A gap before the first tensor, a gap between tensors, and trailing bytes.
    write_raw(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8);
    expect_bad(path, "a", "leave bytes [0, 4) of the data area unclaimed");
    write_raw(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                    "\"b\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[8,16]}}", 16);
    expect_bad(path, "b", "leave bytes [4, 8)");
    write_raw(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 9);
    expect_bad(path, NULL, "5 bytes after the last tensor's data");

    // Overflowing shape product.
    write_raw(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,4]}}", 4);
    expect_bad(path, "a", "overflows");
}

Test(safetensors, overlapping_ranges) {
    char path[1100];
    path_in(path, sizeof path, "overlap.safetensors");
    write_raw(path, "{\"first\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                    "\"second\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12);
    expect_bad(path, "second", "overlap tensor 'first' [0, 8]");

    // The same range claimed twice (listed in reverse data order to exercise the sort).
    write_raw(path, "{\"z\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[4,8]},"
                    "\"y\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                    "\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8);
    expect_bad(path, NULL, "overlap");
}

Test(safetensors, unknown_dtype) {
    char path[1100];
    path_in(path, sizeof path, "dtype.safetensors");
    write_raw(path, "{\"w\":{\"dtype\":\"F8_E4M3\",\"shape\":[4],\"data_offsets\":[0,4]}}", 4);
    expect_bad(path, "w", "unknown dtype 'F8_E4M3'");
    write_raw(path, "{\"w\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
    expect_bad(path, "w", "unknown dtype 'f32'");
}

// An empty dtype is an unknown one; names, keys and values must be UTF-8 (JSON text is), on
// reading and on writing.
Test(safetensors, empty_dtype_and_utf8) {
    char path[1100], err[1024];
    path_in(path, sizeof path, "utf8.safetensors");
    write_raw(path, "{\"w\":{\"dtype\":\"\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
    expect_bad(path, "w", "unknown dtype ''");
    write_raw(path, "{\"w\xff\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
    expect_bad(path, NULL, "malformed header JSON at header byte");

    struct st_writer *w = st_writer_new(path);
    cr_assert_eq(st_writer_add(w, "w\xff", ST_F32, 1, (int64_t[]){1}, err, sizeof err), TP_EXIT_USAGE);
    cr_assert_eq(st_writer_add_metadata(w, "k", "v\xc3", err, sizeof err), TP_EXIT_USAGE);
    cr_assert(strstr(err, "UTF-8"), "%s", err);
    cr_assert_eq(st_writer_add(w, "w\xc3\xa9", ST_F32, 1, (int64_t[]){1}, err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_begin(w, err, sizeof err), 0, "%s", err);
    float one = 1.0f;
    cr_assert_eq(st_writer_write(w, NULL, &one, sizeof one, err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_writer_finish(w, err, sizeof err), 0, "%s", err);
    st_writer_free(w);
    struct st_file f;
    cr_assert_eq(st_open(&f, path, err, sizeof err), 0, "%s", err);
    cr_assert_not_null(st_find(&f, "w\xc3\xa9"));
    st_close(&f);
}

Test(safetensors, malformed_json) {
    char path[1100];
    path_in(path, sizeof path, "json.safetensors");
    static const char *const bad[] = {
        "[]",
        "{\"a\" {\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",   // missing ':'
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},}",  // trailing comma
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}",    // unclosed
        "{\"a\":{\"dtype\":\"F32,\"shape\":[1],\"data_offsets\":[0,4]}}",     // string runs on
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}} x", // text after
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", // fraction
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}",  // negative
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[01],\"data_offsets\":[0,4]}}",  // leading zero
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", // three offsets
        "{\"a\":{\"dtype\":\"F32\",\"shape\":1,\"data_offsets\":[0,4]}}",     // shape not an array
        "{\"a\":{\"dtype\":\"F\\q32\",\"shape\":[1],\"data_offsets\":[0,4]}}", // bad escape
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":tru}}", // bad literal
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":[[[[[[[[[[[[[[[[[[[[[[[[[[[["
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,99999999999999999999999]}}",
        "{\"\\ud800\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", // lone surrogate
        "{\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", // NUL in a name
        "{\"__metadata__\":{\"k\":1},\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_raw(path, bad[i], 4);
        struct st_file f;
        char err[1024];
        int rc = st_open(&f, path, err, sizeof err);
        cr_assert_eq(rc, TP_EXIT_USAGE, "case %zu accepted: %s", i, bad[i]);
        cr_assert(strstr(err, path) == err && !strchr(err, '\n'), "case %zu: %s", i, err);
        cr_assert(strstr(err, "malformed header JSON at header byte"), "case %zu: %s", i, err);
    }
    // Structurally valid JSON that is not a valid entry.
    write_raw(path, "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4);
    expect_bad(path, "a", "entry has no \"shape\"");
    write_raw(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                    "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8);
    expect_bad(path, "a", "appears twice");
}

// Random bit flips anywhere after the length field must never crash the reader or give a
// multi-line message; flips in the header are mostly caught (data is not checksummed).
Test(safetensors, bit_flips_fail_cleanly) {
    char path[1100], err[1024];
    path_in(path, sizeof path, "flip.safetensors");
    void *bufs[N_SPECS];
    write_specs(path, bufs);
    for (size_t i = 0; i < N_SPECS; i++) free(bufs[i]);
    size_t size;
    unsigned char *orig = slurp(path, &size);
    unsigned char *mod = malloc(size);
    uint32_t x = 12345;
    int rejected = 0;
    for (int trial = 0; trial < 400; trial++) {
        x = x * 1664525u + 1013904223u;
        size_t pos = 8 + (x >> 8) % (size - 8);
        memcpy(mod, orig, size);
        mod[pos] ^= (unsigned char)(1u << (x % 8));
        spit(path, mod, size);
        struct st_file f;
        int rc = st_open(&f, path, err, sizeof err);
        if (rc == 0) {
            st_close(&f);
            continue;
        }
        rejected++;
        cr_assert_eq(rc, TP_EXIT_USAGE, "%s", err);
        cr_assert(strstr(err, path) == err && !strchr(err, '\n'), "%s", err);
    }
    cr_assert_gt(rejected, 100, "only %d of 400 flips were detected", rejected);
    free(mod);
    free(orig);
}
