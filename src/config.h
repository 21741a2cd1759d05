// config.h: the run configuration (YAML -> struct tp_config), its defaults and validation.
// Every key documented in README.md maps to one field here. Errors are reported as one line,
// "FILE:LINE:COL: key.path: reason", and make the loaders return TP_EXIT_USAGE.
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#define TP_PATH_MAX 1024
// A config file larger than this, or nesting flow collections ([ {) deeper, is refused before
// libyaml parses it (libyaml's time grows with the square of the flow nesting).
#define CONFIG_MAX_BYTES (1 << 20)
#define CONFIG_MAX_DEPTH 16
// Tokens of one micro-step (micro_batch * seq_len): the ops take it as an int row count.
#define TP_MAX_MICRO_TOKENS (1L << 30)

enum tp_comm_kind { TP_COMM_AUTO = 0, TP_COMM_NCCL, TP_COMM_MPI };
enum tp_schedule { TP_SCHED_COSINE = 0, TP_SCHED_LINEAR, TP_SCHED_CONSTANT };
enum tp_precision { TP_PREC_FP32 = 0, TP_PREC_BF16 };
enum tp_device_kind { TP_DEVICE_AUTO = 0, TP_DEVICE_CPU, TP_DEVICE_CUDA };
// What backward recomputes instead of keeping from forward (docs/memory.md): nothing; the GELU
// output and the attention core; or each block from its input.
enum tp_recompute { TP_RECOMPUTE_NONE = 0, TP_RECOMPUTE_SELECTIVE, TP_RECOMPUTE_FULL };

struct tp_model_config {
    int n_layer;     // transformer blocks
    int n_head;      // attention heads (must divide by tp)
    int n_embd;      // width C
    int vocab_size;  // V, unpadded (50257 for GPT-2)
    int seq_len;     // T, also the number of learned positions
};

struct tp_parallel_config {
    int tp;                  // tensor-parallel size
    int dp;                  // data-parallel size; 0 = derive from world size / tp
    enum tp_comm_kind comm;  // auto | nccl | mpi
    enum tp_device_kind device; // auto | cpu | cuda
    bool sequence_parallel;  // shard layernorm, residual and embedding activations along the tokens
    bool distributed_optimizer; // shard AdamW's state over DP (ZeRO stage 1)
    double dp_bucket_mb;     // MiB of fp32 gradients per DP reduction bucket; 0 = one bucket
};

struct tp_train_config {
    int micro_batch;         // sequences per rank per micro-step (B)
    long global_batch;       // tokens per optimizer step across all DP ranks; 0 = from grad_accum
    int grad_accum;          // micro-steps per optimizer step; 0 = from global_batch
    int steps;               // optimizer steps
    double lr;               // peak learning rate
    double min_lr;           // floor of the decay schedules
    int warmup_steps;        // linear warmup from 0 to lr
    enum tp_schedule schedule;
    double weight_decay;     // AdamW decoupled weight decay, 2-D weights only
    double beta1, beta2, eps;
    double grad_clip;        // global L2 norm clip; 0 disables
    unsigned long long seed; // init, data order and sampling
    enum tp_precision precision;
    enum tp_recompute recompute; // none | selective | full
};

struct tp_data_config {
    char train[TP_PATH_MAX]; // glob of training shards
    char val[TP_PATH_MAX];   // glob of validation shards ("" = no validation)
};

struct tp_eval_config {
    int every;   // validate every N optimizer steps (0 = only at the end)
    int batches; // micro-batches per validation
};

struct tp_checkpoint_config {
    char dir[TP_PATH_MAX];    // "" = no checkpoints
    int every;                // save every N steps (0 = only at the end)
    int keep;                 // newest checkpoints kept (0 = all)
    char resume[TP_PATH_MAX]; // "" = fresh start, "auto" = newest in dir, or a checkpoint path
};

struct tp_log_config {
    int every;                 // print a line every N steps
    char jsonl[TP_PATH_MAX];   // "" = no JSON-lines log
    double peak_tflops;        // device peak for MFU; 0 = pick from precision and device
};

struct tp_init_config {
    char from[TP_PATH_MAX];    // "" = random init, else a checkpoint dir or a .safetensors file
};

struct tp_debug_config {
    bool check_replicas;       // hash replicated parameters across the TP group every step
    char dump_init[TP_PATH_MAX]; // "" = none, else a .safetensors file for the initial weights
    bool grad_norms;           // log per-tensor gradient norms of the first step
    int profile_step;          // 0 = none, else the step (from 1) a profiler's capture range brackets
};

// Room in the private origin table below; config.c checks that its key table fits.
#define TP_CONFIG_MAX_KEYS 64

// Where one key's current value came from, so that validation can point at it.
struct tp_config_origin {
    int line, col; // 1-based position in tp_config.source; line 0 = default, line -1 = --set
};

struct tp_config {
    char source[TP_PATH_MAX];  // the file it came from ("<default>" for the embedded one)
    struct tp_model_config model;
    struct tp_parallel_config parallel;
    struct tp_train_config train;
    struct tp_data_config data;
    struct tp_eval_config eval;
    struct tp_checkpoint_config checkpoint;
    struct tp_log_config log;
    struct tp_init_config init;
    struct tp_debug_config debug;
    // Private to config.c: one entry per key of its key table, in table order.
    struct tp_config_origin origin[TP_CONFIG_MAX_KEYS];
};

// Fills every field with its default (the values documented in README.md).
void config_defaults(struct tp_config *cfg);

// Parses a YAML file on top of the current contents of cfg (call config_defaults first).
// On error writes one line to err (size errlen) and returns TP_EXIT_USAGE; 0 on success.
int config_load_file(struct tp_config *cfg, const char *path, char *err, size_t errlen);

// Same for an in-memory YAML document; `name` is used in messages in place of a path.
int config_load_string(struct tp_config *cfg, const char *yaml, size_t len, const char *name,
                       char *err, size_t errlen);

// Applies one "--set key.path=value" override with the same type and range checks as the file.
// Messages read "--set key.path=value: reason".
int config_apply_set(struct tp_config *cfg, const char *assignment, char *err, size_t errlen);

// Cross-field validation that needs the world size (divisibility, batch arithmetic, data files).
// Pass world_size = 0 to skip the checks that need it. Derives parallel.dp, train.grad_accum and
// train.global_batch. Messages name the key and, where known, its position in the source file.
int config_validate(struct tp_config *cfg, int world_size, char *err, size_t errlen);

// config_validate without the file checks (data globs, init.from): for modes that read no data,
// such as --bench model on synthetic tokens.
int config_validate_model(struct tp_config *cfg, int world_size, char *err, size_t errlen);

// Writes the resolved config as YAML (loadable again) to f.
void config_print(const struct tp_config *cfg, FILE *f);

// The embedded default config (configs/tiny.yaml's contents) used when no file is given.
extern const char config_default_yaml[];

const char *config_comm_name(enum tp_comm_kind k);
const char *config_schedule_name(enum tp_schedule s);
const char *config_precision_name(enum tp_precision p);
const char *config_device_name(enum tp_device_kind d);
const char *config_recompute_name(enum tp_recompute r);
