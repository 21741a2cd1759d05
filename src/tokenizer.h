// tokenizer.h: the GPT-2 tokenizer file (data/gpt2_tokenizer.bin): a decode table, and from
// version 3 on the BPE merges that src/bpe.c encodes text with.
//
// Layout (little-endian; docs/text.md has the full description):
//   header  256 x uint32: magic 20240328, version (2 or 3), vocab size, EOT id;
//           version 3 adds [4] the number of merges and [5] the pre-tokeniser (1 = GPT-2's)
//   table   per token, in id order: a uint8 length, then that many bytes
//   merges  (version 3) per merge, in rank order: uint32 left, right, result token ids, where
//           result's bytes are left's followed by right's
// Version 2 is llm.c's gpt2_tokenizer.bin, read as it is: it decodes but cannot encode.
#pragma once

#include <stddef.h>
#include <stdint.h>

#define TOKENIZER_MAGIC 20240328u
#define TOKENIZER_VERSION_DECODE 2u // decode table only (llm.c's)
#define TOKENIZER_VERSION 3u        // decode table and merges (written by scripts/make_tokenizer_bin.py)
#define TOKENIZER_HEADER_INTS 256
#define TOKENIZER_PRETOKENIZER_GPT2 1u

struct tokenizer {
    int version;            // 2 or 3
    int vocab_size;
    int eot;
    char **pieces;          // (vocab_size) byte strings, NUL-terminated (a piece may hold a NUL)
    unsigned char *lengths; // (vocab_size) bytes in each piece
    int n_merges;           // 0 in version 2
    uint32_t *merges;       // (n_merges, 3) left, right, result; a merge's index is its rank
    size_t merges_offset;   // byte offset of the first merge record in the file
};

// Reads and checks a version 2 or 3 file: magic, version, header sizes, every length, and in
// version 3 that each merge's ids are in range and its result spells left + right, and that
// nothing follows the last merge. On error writes one line naming the file, the byte offset and
// the fix into err and returns TP_EXIT_USAGE (2), leaving tk empty.
int tokenizer_load(struct tokenizer *tk, const char *path, char *err, size_t errlen);
// Returns the bytes of one token ("" for out-of-range ids).
const char *tokenizer_decode(const struct tokenizer *tk, int token);
void tokenizer_free(struct tokenizer *tk);
