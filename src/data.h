// data.h: token shards in llm.c's format and per-DP-rank batches.
//
// A shard is a 256 x int32 header (magic 20240520, version 1, token count, rest 0) followed by
// `count` uint16 tokens. Shards are memory-mapped; nothing reads a whole shard into memory.
// Batching: the concatenation of all shards (in sorted glob order) is one token stream. Each
// micro-batch is B sequences of T+1 tokens (inputs and shifted targets). DP rank d of D takes
// its own disjoint sequences: global sequence index s = (position * D + d); every TP rank of one
// DP group therefore reads the same tokens.
#pragma once

#include <stddef.h>
#include <stdint.h>

#define DATA_SHARD_MAGIC 20240520
#define DATA_SHARD_VERSION 1
#define DATA_HEADER_INTS 256

struct data_shard {
    char path[1024];
    const uint16_t *tokens; // (count) mapped
    size_t count;
    void *map;              // mmap base
    size_t map_bytes;
};

struct data_loader {
    struct data_shard *shards;
    int n_shards;
    size_t total_tokens;    // sum of counts
    int B, T;               // micro-batch shape
    int dp_rank, dp_size;
    int vocab_size;         // every token read is checked to be below this
    size_t n_seqs;          // sequences of T+1 tokens (stride T) in the stream
    size_t position;        // next micro-batch index for this rank (the resumable state)
    // host buffers for the current micro-batch
    int *inputs;            // (B, T)
    int *targets;           // (B, T)
};

// Opens every file matching the glob. On error writes one line naming the file, the offset or
// field, and the fix, into err and returns TP_EXIT_USAGE (2); 0 on success.
int data_open(struct data_loader *dl, const char *glob_pattern, int B, int T, int dp_rank,
              int dp_size, int vocab_size, char *err, size_t errlen);

// Fills dl->inputs / dl->targets with the next micro-batch and advances position. Wraps around
// at the end of the stream (an epoch). Returns 0, or TP_EXIT_USAGE with err set if a token is
// out of range (names the shard and the token offset).
int data_next(struct data_loader *dl, char *err, size_t errlen);

// Micro-batches per epoch for one DP rank.
size_t data_batches_per_epoch(const struct data_loader *dl);

// Rewinds to a given micro-batch position (resume, or restarting validation).
void data_seek(struct data_loader *dl, size_t position);

void data_close(struct data_loader *dl);

// Writes a shard file (used by tests and scripts). Returns 0 or -1 with errno set.
int data_write_shard(const char *path, const uint16_t *tokens, size_t count);
