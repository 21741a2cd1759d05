// test_text.c: text on the command line: --generate from --prompt TEXT, --format text|ids|jsonl,
// --encode FILE and --tokenizer, their usage errors (exit 2, one line naming the option), and
// greedy generation from a text prompt equal to generation from tiktoken's ids of the same text
// given as --prompt-tokens, at tp=1 and tp=2.
#include <criterion/criterion.h>

#include <jansson.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "testutil.h"
#include "text.h"

static char g_dir[1024];   // per-test scratch directory
static char g_out[1 << 16]; // output of the last command

static void setup(void) { tu_tmpdir(g_dir, sizeof g_dir, "text"); }
static void teardown(void) { tu_rmtree(g_dir); }

TestSuite(text, .init = setup, .fini = teardown, .timeout = 300);

// Runs tptrain from the source root (np = 1: no launcher); standard output and error in g_out,
// or standard output only with stdout_only (standard error then goes to DIR/stderr.txt).
__attribute__((format(printf, 3, 4))) static int tpt(int np, bool stdout_only, const char *fmt, ...) {
    char args[1 << 14];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    char redirect[1200] = "";
    if (stdout_only) snprintf(redirect, sizeof redirect, "2>'%s/stderr.txt'", g_dir);
    if (np == 1)
        return tu_run(g_out, sizeof g_out, "cd '%s' && '%s' %s %s", tu_source_root(), tu_tptrain(), args, redirect);
    return tu_run(g_out, sizeof g_out, "cd '%s' && '%s' -np %d %s '%s' %s %s", tu_source_root(), tu_mpiexec(), np,
                  tu_mpiexec_flags(), tu_tptrain(), args, redirect);
}

// s in single quotes for sh, with each ' written as '\''.
static void shell_quote(char *out, size_t len, const char *s) {
    size_t k = 0;
    out[k++] = '\'';
    for (; *s && k + 5 < len; s++) {
        if (*s == '\'') {
            memcpy(out + k, "'\\''", 4);
            k += 4;
        } else {
            out[k++] = *s;
        }
    }
    out[k++] = '\'';
    out[k] = '\0';
}

// Exit 2 and exactly one line, "tptrain: ...", holding both needles.
static void expect_usage_error(int rc, const char *needle1, const char *needle2) {
    cr_assert_eq(rc, 2, "expected exit 2, got %d:\n%s", rc, g_out);
    size_t len = strlen(g_out);
    cr_assert(len > 0 && strchr(g_out, '\n') == g_out + len - 1, "expected one line:\n%s", g_out);
    cr_assert(strncmp(g_out, "tptrain: ", 9) == 0, "%s", g_out);
    cr_assert(strstr(g_out, needle1), "'%s' missing from: %s", needle1, g_out);
    if (needle2) cr_assert(strstr(g_out, needle2), "'%s' missing from: %s", needle2, g_out);
}

// Whitespace-separated ids; returns the count.
static int parse_ids(const char *s, int *ids, int max) {
    int n = 0;
    for (char *end; n < max; s = end) {
        long v = strtol(s, &end, 10);
        if (end == s) break;
        ids[n++] = (int)v;
    }
    return n;
}

// A prompt with a newline, contractions (one in odd case), a dash, an accent, CJK and an emoji,
// and tiktoken's gpt2 ids of it (encode_ordinary).
static const char *prompt = "ROMEO:\nWhat's here? I'M Romeo \xe2\x80\x94 caf\xc3\xa9, \xe4\xbd\xa0\xe5\xa5\xbd \xf0\x9f\x91\x8d!";
static const int prompt_ids[] = {33676, 4720, 25, 198, 2061, 338, 994, 30, 314, 6, 44, 43989,
                                 851, 40304, 11, 220, 19526, 254, 25001, 121, 50169, 235, 0};
#define N_PROMPT ((int)(sizeof prompt_ids / sizeof prompt_ids[0]))

// ---- usage errors

Test(text, usage_errors) {
    char p[1200];
    tu_write_file(p, sizeof p, g_dir, "ids.txt", "1 2 3\n");
    expect_usage_error(tpt(1, false, "--eval %s --generate 5 --prompt hi --prompt-tokens %s", g_dir, p), "--prompt",
                       "use one");
    expect_usage_error(tpt(1, false, "--eval %s --prompt hi", g_dir), "--prompt", "--generate N");
    expect_usage_error(tpt(1, false, "--eval %s --prompt-tokens %s", g_dir, p), "--prompt-tokens", "--generate N");
    expect_usage_error(tpt(1, false, "--prompt hi"), "--prompt", "--eval");
    expect_usage_error(tpt(1, false, "--generate 5 --prompt hi"), "--generate", "--eval CHECKPOINT_DIR");
    expect_usage_error(tpt(1, false, "--eval %s --generate 5 --format xml", g_dir), "--format xml", "text, ids or jsonl");
    expect_usage_error(tpt(1, false, "--eval %s --format ids", g_dir), "--format", "--generate N or --encode FILE");
    expect_usage_error(tpt(1, false, "--eval %s --generate 5 --prompt ''", g_dir), "--prompt", "empty");
    expect_usage_error(tpt(1, false, "--tokenizer data/gpt2_tokenizer.bin"), "--tokenizer", NULL);
    expect_usage_error(tpt(1, false, "--encode %s --eval %s", p, g_dir), "--encode", "mode of its own");
    expect_usage_error(tpt(1, false, "--encode %s configs/tiny.yaml", p), "--encode", "mode of its own");
    expect_usage_error(tpt(1, false, "--encode %s --format text", p), "--format text", "ids or jsonl");
    expect_usage_error(tpt(1, false, "--encode %s/absent.txt", g_dir), "absent.txt", "cannot open");
    expect_usage_error(tpt(1, false, "--encode %s --tokenizer %s/absent.bin", p, g_dir), "absent.bin",
                       "cannot open the tokenizer");
    expect_usage_error(tpt(1, false, "--encode %s --tokenizer %s", p, p), "ids.txt", "truncated header");
    expect_usage_error(tpt(1, false, "--prompt"), "'--prompt' needs a value", NULL);
}

// The bounds of text_encode_prompt: one argument cannot be longer than 128 KiB on Linux, so the
// 1 MiB bound is checked through the function the CLI calls.
Test(text, prompt_bounds) {
    struct text_codec tc;
    char err[1024] = "", path[1200];
    snprintf(path, sizeof path, "%s/data/gpt2_tokenizer.bin", tu_source_root());
    cr_assert_eq(text_open(&tc, path, true, err, sizeof err), 0, "%s", err);
    int *ids, n;
    char *big = malloc(TEXT_MAX_PROMPT_BYTES + 2);
    memset(big, 'a', TEXT_MAX_PROMPT_BYTES + 1);
    big[TEXT_MAX_PROMPT_BYTES + 1] = '\0';
    cr_assert_eq(text_encode_prompt(&tc, big, 50257, &ids, &n, err, sizeof err), TP_EXIT_USAGE);
    cr_assert(strstr(err, "--prompt: 1048577 bytes") && strstr(err, "--prompt-tokens"), "%s", err);
    big[TEXT_MAX_PROMPT_BYTES] = '\0'; // exactly the bound: 1 MiB of 'a' encodes
    cr_assert_eq(text_encode_prompt(&tc, big, 50257, &ids, &n, err, sizeof err), 0, "%s", err);
    cr_assert_gt(n, 0);
    free(ids);
    free(big);
    cr_assert_eq(text_encode_prompt(&tc, "", 50257, &ids, &n, err, sizeof err), TP_EXIT_USAGE);
    cr_assert(strstr(err, "empty"), "%s", err);
    // a model with a smaller vocabulary: the id that does not fit is named
    cr_assert_eq(text_encode_prompt(&tc, "ab Hello", 512, &ids, &n, err, sizeof err), TP_EXIT_USAGE);
    cr_assert(strstr(err, "token 2 of the text is id 18435") && strstr(err, "[0, 512)"), "%s", err);
    cr_assert_eq(text_encode_prompt(&tc, prompt, 50257, &ids, &n, err, sizeof err), 0, "%s", err);
    cr_assert_eq(n, N_PROMPT);
    for (int i = 0; i < n; i++) cr_assert_eq(ids[i], prompt_ids[i], "id %d: %d, tiktoken %d", i, ids[i], prompt_ids[i]);
    free(ids);
    text_close(&tc);
}

// ---- --encode

Test(text, encode_file) {
    char p[1200], q[1200];
    FILE *f;
    snprintf(p, sizeof p, "%s/prompt.txt", g_dir);
    cr_assert((f = fopen(p, "wb")));
    fputs(prompt, f);
    fclose(f);
    int ids[64];
    cr_assert_eq(tpt(1, true, "--encode %s", p), 0, "%s", g_out);
    cr_assert_eq(parse_ids(g_out, ids, 64), N_PROMPT, "%s", g_out);
    for (int i = 0; i < N_PROMPT; i++) cr_assert_eq(ids[i], prompt_ids[i], "id %d", i);
    cr_assert_eq(tpt(1, true, "--encode - < %s", p), 0, "%s", g_out); // standard input
    cr_assert_eq(parse_ids(g_out, ids, 64), N_PROMPT, "%s", g_out);
    cr_assert_eq(tpt(1, true, "--encode %s --format jsonl", p), 0, "%s", g_out);
    json_error_t e;
    json_t *j = json_loads(g_out, 0, &e);
    cr_assert(j, "not JSON (%s): %s", e.text, g_out);
    cr_assert_eq(json_integer_value(json_object_get(j, "bytes")), (json_int_t)strlen(prompt));
    json_t *a = json_object_get(j, "ids");
    cr_assert_eq(json_array_size(a), (size_t)N_PROMPT);
    for (int i = 0; i < N_PROMPT; i++) cr_assert_eq(json_integer_value(json_array_get(a, (size_t)i)), prompt_ids[i]);
    json_decref(j);
    // bytes that are not UTF-8 encode as well (tiktoken's ids, from tests/data/bpe_cases.txt)
    snprintf(q, sizeof q, "%s/bad.txt", g_dir);
    cr_assert((f = fopen(q, "wb")));
    fputs("hello \xff world", f);
    fclose(f);
    cr_assert_eq(tpt(1, true, "--encode %s", q), 0, "%s", g_out);
    int want[] = {31373, 220, 187, 995}, got[16]; // " \xff world" is one piece after the bad byte
    cr_assert_eq(parse_ids(g_out, got, 16), 4, "%s", g_out);
    for (int i = 0; i < 4; i++) cr_assert_eq(got[i], want[i], "id %d: %d", i, got[i]);
    // an empty file: no ids
    tu_write_file(q, sizeof q, g_dir, "empty.txt", "");
    cr_assert_eq(tpt(1, true, "--encode %s", q), 0, "%s", g_out);
    cr_assert_str_eq(g_out, "");
}

// ---- generation

// One training run's checkpoint serves every generation check below.
static void train_tiny(void) {
    int rc = tpt(1, false, "configs/tiny.yaml --set train.steps=20 --set eval.every=0 --set log.every=20 "
                 "--set checkpoint.dir=%s/ck", g_dir);
    cr_assert_eq(rc, 0, "training failed:\n%s", g_out);
}

// The ids a --format ids run printed (prompt and sample); returns the count.
static int run_ids(int np, int *ids, int max, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int run_ids(int np, int *ids, int max, const char *fmt, ...) {
    char args[1 << 13];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    int rc = tpt(np, true, "--eval %s/ck --generate 24 --format ids %s", g_dir, args);
    cr_assert_eq(rc, 0, "exit %d: %s", rc, g_out);
    cr_assert_eq(strchr(g_out, '\n'), g_out + strlen(g_out) - 1, "one line of ids: %s", g_out);
    return parse_ids(g_out, ids, max);
}

Test(text, greedy_from_text_equals_greedy_from_ids) {
    train_tiny();
    char quoted[512], ids_file[1200], list[512] = "";
    shell_quote(quoted, sizeof quoted, prompt);
    for (int i = 0; i < N_PROMPT; i++) snprintf(list + strlen(list), sizeof list - strlen(list), "%d\n", prompt_ids[i]);
    tu_write_file(ids_file, sizeof ids_file, g_dir, "prompt_ids.txt", list);

    int a[128], b[128];
    int na = run_ids(1, a, 128, "--top-k 1 --prompt %s", quoted);
    int nb = run_ids(1, b, 128, "--top-k 1 --prompt-tokens %s", ids_file);
    cr_assert_eq(na, N_PROMPT + 24, "%d ids", na);
    cr_assert_eq(nb, na);
    for (int i = 0; i < N_PROMPT; i++) cr_assert_eq(a[i], prompt_ids[i], "prompt id %d: %d, tiktoken %d", i, a[i], prompt_ids[i]);
    for (int i = 0; i < na; i++) cr_assert_eq(a[i], b[i], "id %d: %d from --prompt, %d from --prompt-tokens", i, a[i], b[i]);
    // sampling as well (a model trained this briefly is greedy towards newlines whatever the
    // prompt); another prompt leads to another sample with the same seed
    int s1[128], s2[128], c[128];
    int ns = run_ids(1, s1, 128, "--top-k 40 --seed 3 --prompt %s", quoted);
    cr_assert_eq(run_ids(1, s2, 128, "--top-k 40 --seed 3 --prompt-tokens %s", ids_file), ns);
    for (int i = 0; i < ns; i++) cr_assert_eq(s1[i], s2[i], "sampled id %d: %d from --prompt, %d from --prompt-tokens", i, s1[i], s2[i]);
    int nc = run_ids(1, c, 128, "--top-k 40 --seed 3 --prompt 'JULIET: Good night, good night!'");
    bool same = true;
    for (int i = 0; i < 24; i++) same &= c[nc - 24 + i] == s1[ns - 24 + i];
    cr_assert_not(same, "two prompts gave the same sample");

    // text: the prompt, then the sample's text; jsonl: all of it, parsed
    cr_assert_eq(tpt(1, false, "--eval %s/ck --generate 24 --top-k 1 --prompt %s", g_dir, quoted), 0, "%s", g_out);
    const char *body = strchr(g_out, '\n') + 1; // after the "generating" line
    cr_assert(strncmp(body, prompt, strlen(prompt)) == 0, "the text starts with the prompt:\n%s", g_out);
    cr_assert_eq(tpt(1, true, "--eval %s/ck --generate 24 --top-k 1 --prompt %s --format jsonl", g_dir, quoted), 0,
                 "%s", g_out);
    json_error_t e;
    json_t *j = json_loads(g_out, 0, &e);
    cr_assert(j, "not one JSON object (%s): %s", e.text, g_out);
    cr_assert_str_eq(json_string_value(json_object_get(j, "prompt")), prompt);
    json_t *pi = json_object_get(j, "prompt_ids"), *gi = json_object_get(j, "ids");
    cr_assert_eq(json_array_size(pi), (size_t)N_PROMPT);
    cr_assert_eq(json_array_size(gi), 24);
    for (int i = 0; i < 24; i++) cr_assert_eq(json_integer_value(json_array_get(gi, (size_t)i)), a[N_PROMPT + i]);
    cr_assert(json_is_string(json_object_get(j, "text")));
    cr_assert_eq(json_integer_value(json_object_get(j, "top_k")), 1);
    json_decref(j);

    if (tu_mpiexec()[0]) { // tp=2 encodes on every rank and samples the same tokens
        int d[128];
        int nd = run_ids(2, d, 128, "--top-k 1 --prompt %s", quoted);
        cr_assert_eq(nd, na);
        for (int i = 0; i < na; i++) cr_assert_eq(d[i], a[i], "tp=2, id %d: %d against %d", i, d[i], a[i]);
    }

    // a version 2 tokenizer (llm.c's) decodes --prompt-tokens samples but cannot encode --prompt
    char src[1200], v2[1200];
    snprintf(src, sizeof src, "%s/data/gpt2_tokenizer.bin", tu_source_root());
    snprintf(v2, sizeof v2, "%s/v2.bin", g_dir);
    FILE *in = fopen(src, "rb"), *out = fopen(v2, "wb");
    cr_assert(in && out);
    static unsigned char buf[372108];
    cr_assert_eq(fread(buf, 1, sizeof buf, in), sizeof buf);
    buf[4] = 2;                 // version 2
    memset(buf + 16, 0, 8);     // no merges, no pre-tokeniser
    cr_assert_eq(fwrite(buf, 1, sizeof buf, out), sizeof buf);
    fclose(in);
    fclose(out);
    expect_usage_error(tpt(1, false, "--eval %s/ck --generate 4 --prompt hi --tokenizer %s", g_dir, v2), "v2.bin",
                       "holds no merges");
    int v[128];
    int nv = run_ids(1, v, 128, "--top-k 1 --prompt-tokens %s --tokenizer %s", ids_file, v2);
    cr_assert_eq(nv, na);
    for (int i = 0; i < na; i++) cr_assert_eq(v[i], a[i]);
}
