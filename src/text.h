// text.h: text in and out of the command line: the tokenizer file and the BPE encoder opened
// together, --prompt TEXT encoded with bounds checks, --encode FILE, the output formats of
// --generate (text, ids, JSON lines) and JSON strings from bytes that may not be UTF-8.
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "bpe.h"
#include "tokenizer.h"

#define TEXT_TOKENIZER_PATH "data/gpt2_tokenizer.bin"
// --prompt takes at most this many bytes (so at most as many tokens: the bound --generate has)
#define TEXT_MAX_PROMPT_BYTES (1 << 20)
// --encode reads at most this much; corpora go through scripts/prepare_data.py
#define TEXT_MAX_ENCODE_BYTES ((size_t)256 << 20)

enum text_format {
    TEXT_FORMAT_TEXT,  // the decoded text (the default)
    TEXT_FORMAT_IDS,   // whitespace-separated token ids
    TEXT_FORMAT_JSONL, // one JSON object per line
};

// "text", "ids" or "jsonl"; returns 0, or -1 for anything else.
int text_parse_format(const char *s, enum text_format *out);

struct text_codec {
    struct tokenizer tk;
    struct bpe bpe;
    bool can_encode;
};

// Loads the tokenizer file at path, and the encoder too when `encode` is set (which needs a
// version 3 file). Returns 0 or TP_EXIT_USAGE with one line in err.
int text_open(struct text_codec *tc, const char *path, bool encode, char *err, size_t errlen);
void text_close(struct text_codec *tc);

// Encodes --prompt TEXT: non-empty, at most TEXT_MAX_PROMPT_BYTES, every id below vocab_size.
// *ids is malloc'd. Returns 0 or TP_EXIT_USAGE with err set.
int text_encode_prompt(const struct text_codec *tc, const char *text, int vocab_size, int **ids, int *n,
                       char *err, size_t errlen);

// --encode FILE ("-": standard input): prints FILE's token ids in the format (ids, or one JSON line
// with the file, its size and the ids). Returns the exit code; errors are printed.
int text_encode_file(const char *path, const char *tokenizer_path, enum text_format format);

// The bytes of ids [0, n) through the decode table (malloc'd, NUL-terminated); *len bytes.
char *text_decode(const struct tokenizer *tk, const int *ids, size_t n, size_t *len);
// A JSON string of n bytes: UTF-8 as it is, each byte that starts no well-formed sequence as
// U+FFFD (a character cut between two tokens, say; the ids stay exact).
json_t *text_json_string(const char *bytes, size_t n);
// A JSON array of ids.
json_t *text_json_ids(const int *ids, size_t n);
