// main.c: the tptrain command line: train (default), --dry-run, --eval, --bench.
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <mpi.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "bench.h"
#include "config.h"
#include "eval.h"
#include "text.h"
#include "train.h"

#define MAX_SETS 256

static const char usage_text[] =
    "usage:\n"
    "  tptrain [CONFIG.yaml] [--set KEY=VALUE]... [--dry-run]\n"
    "      Train the model the config describes (the built-in configs/tiny.yaml when no file is\n"
    "      given). Run under mpirun/srun for tensor and data parallelism:\n"
    "        mpirun -np 4 tptrain configs/tiny.yaml --set parallel.tp=2\n"
    "  tptrain --eval CHECKPOINT_DIR [--data GLOB] [--batches N] [--set KEY=VALUE]...\n"
    "          [--generate N [--temperature T] [--top-k K] [--seed S]\n"
    "           [--prompt TEXT | --prompt-tokens FILE] [--format text|ids|jsonl]]\n"
    "          [--export-llmc FILE.bin]\n"
    "      Evaluate a checkpoint's validation loss (any TP size), or sample text from it.\n"
    "  tptrain --encode FILE [--format ids|jsonl] [--tokenizer FILE]\n"
    "      Print the GPT-2 token ids of FILE's text ('-': standard input).\n"
    "  tptrain --bench layer M K N | allreduce SIZES... | allreduce MIN:MAX:FACTOR | model CONFIG.yaml\n"
    "  tptrain --bench attention [BxHxHSxT | CONFIG.yaml]...\n"
    "          [--json FILE] [--set KEY=VALUE]...\n"
    "      Benchmark parallel layers, the all-reduce, or one training step (N ranks = TP size).\n"
    "\n"
    "options:\n"
    "  -s, --set KEY=VALUE   override one config key (e.g. --set train.lr=3e-4); repeatable\n"
    "  -n, --dry-run         validate the config; print it resolved, the mesh, every parameter's\n"
    "                        global and per-rank shape and layout, and per-rank memory; exit\n"
    "  -e, --eval DIR        evaluation mode\n"
    "  -b, --bench           benchmark mode\n"
    "      --data GLOB       --eval: validation shards (default: the checkpoint's data.val)\n"
    "      --batches N       --eval: micro-batches to evaluate (default: eval.batches)\n"
    "      --generate N      --eval: sample N tokens through the GPT-2 decode table\n"
    "      --temperature T   --eval: sampling temperature (default 1.0)\n"
    "      --top-k K         --eval: sample among the K most likely tokens (default: all)\n"
    "      --seed S          --eval: sampling seed (default: train.seed)\n"
    "      --prompt TEXT     --eval: text to start from, encoded with GPT-2's BPE (at most\n"
    "                        1 MiB; the default start is end-of-text)\n"
    "      --prompt-tokens F --eval: file of whitespace-separated token ids to start from\n"
    "      --format F        --generate: text (default), ids (the prompt's and the sample's\n"
    "                        token ids), or jsonl (one JSON line: prompt, text and their ids);\n"
    "                        --encode: ids (default) or jsonl\n"
    "      --tokenizer F     --generate, --encode: the tokenizer file (default\n"
    "                        data/gpt2_tokenizer.bin, from the current directory)\n"
    "      --encode FILE     print FILE's token ids (as --prompt-tokens reads them) and exit\n"
    "      --export-llmc F   --eval: write the checkpoint's weights as llm.c's model file F instead\n"
    "                        (bf16, version 5, when F ends in _bf16.bin; else fp32, version 3)\n"
    "      --json FILE       --bench: also write the results as JSON\n"
    "  -h, --help            this text\n"
    "  -V, --version         print the version\n"
    "\n"
    "exit codes: 0 success, 1 runtime failure, 2 usage, config or input error,\n"
    "  3 preempted (SIGTERM/SIGUSR1: stopped at a step boundary with a checkpoint saved;\n"
    "  continue with --set checkpoint.resume=auto)\n";

struct cli {
    const char *config_path;
    const char *sets[MAX_SETS];
    int n_sets;
    bool dry_run;
    const char *eval_dir;
    bool bench;
    char *pos[MAX_SETS];  // positional arguments in order
    int n_pos;
    struct eval_opts eval;
    const char *json_path;
    const char *encode_path;
    const char *format;       // as given (checked against the mode)
};

static int parse_int(const char *s, const char *opt, int min, int *out, bool root) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < min || v > 2147483647L) {
        if (root) fprintf(stderr, "tptrain: %s %s: expected an integer >= %d\n", opt, s, min);
        return TP_EXIT_USAGE;
    }
    *out = (int)v;
    return 0;
}

static int parse_double(const char *s, const char *opt, double *out, bool root) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s || !(v > 0) || !isfinite(v)) {
        if (root) fprintf(stderr, "tptrain: %s %s: expected a positive finite number\n", opt, s);
        return TP_EXIT_USAGE;
    }
    *out = v;
    return 0;
}

// The options of --generate and --encode: each needs its mode, and the two prompts exclude each
// other. Returns -1 to continue, or TP_EXIT_USAGE.
static int check_text_options(const struct cli *cli, bool root) {
    const struct eval_opts *e = &cli->eval;
    const char *culprit = NULL, *fix = NULL;
    if (cli->encode_path && (cli->eval_dir || cli->bench || cli->config_path || cli->dry_run))
        culprit = "--encode", fix = "it is a mode of its own: give it without a config, --eval, --bench or --dry-run";
    else if (e->generate && !cli->eval_dir)
        culprit = "--generate", fix = "it samples from a checkpoint: add --eval CHECKPOINT_DIR";
    else if (e->prompt_text && e->prompt_tokens)
        culprit = "--prompt", fix = "--prompt and --prompt-tokens both give the prompt; use one";
    else if (e->prompt_text && !e->generate)
        culprit = "--prompt", fix = "it is the start of a sample: add --eval CHECKPOINT_DIR --generate N";
    else if (e->prompt_tokens && !e->generate)
        culprit = "--prompt-tokens", fix = "it is the start of a sample: add --eval CHECKPOINT_DIR --generate N";
    else if (cli->format && !e->generate && !cli->encode_path)
        culprit = "--format", fix = "it shapes the output of --generate N or --encode FILE; add one";
    else if (cli->format && cli->encode_path && e->format == TEXT_FORMAT_TEXT)
        culprit = "--format text", fix = "--encode prints ids or jsonl";
    else if (e->tokenizer && !e->generate && !cli->encode_path)
        culprit = "--tokenizer", fix = "only --generate N and --encode FILE read the tokenizer";
    else if (e->prompt_text && strlen(e->prompt_text) > TEXT_MAX_PROMPT_BYTES)
        culprit = "--prompt", fix = "longer than 1048576 bytes; put the token ids in a file for --prompt-tokens "
                                    "(tptrain --encode FILE writes them)";
    else if (e->prompt_text && !e->prompt_text[0])
        culprit = "--prompt", fix = "the text is empty; give some, or leave --prompt out to start from end-of-text";
    if (!culprit) return -1;
    if (root) fprintf(stderr, "tptrain: %s: %s\n", culprit, fix);
    return TP_EXIT_USAGE;
}

// Parses argv; returns -1 to continue, or an exit code.
static int parse_cli(struct cli *cli, int argc, char **argv, bool root) {
    static const struct option opts[] = {
        {"set", required_argument, NULL, 's'},    {"dry-run", no_argument, NULL, 'n'},
        {"eval", required_argument, NULL, 'e'},   {"bench", no_argument, NULL, 'b'},
        {"help", no_argument, NULL, 'h'},         {"version", no_argument, NULL, 'V'},
        {"data", required_argument, NULL, 1},     {"batches", required_argument, NULL, 2},
        {"generate", required_argument, NULL, 3}, {"temperature", required_argument, NULL, 4},
        {"top-k", required_argument, NULL, 5},    {"seed", required_argument, NULL, 6},
        {"prompt-tokens", required_argument, NULL, 7}, {"json", required_argument, NULL, 8},
        {"export-llmc", required_argument, NULL, 9}, {"prompt", required_argument, NULL, 10},
        {"format", required_argument, NULL, 11},  {"encode", required_argument, NULL, 12},
        {"tokenizer", required_argument, NULL, 13},
        {NULL, 0, NULL, 0},
    };
    memset(cli, 0, sizeof *cli);
    cli->eval.temperature = 1.0;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "+s:ne:bhV", opts, NULL)) != -1 || optind < argc) {
        if (c == -1) { // a positional argument; options may follow it
            if (cli->n_pos == MAX_SETS) {
                if (root) fprintf(stderr, "tptrain: too many arguments\n");
                return TP_EXIT_USAGE;
            }
            cli->pos[cli->n_pos++] = argv[optind++];
            continue;
        }
        switch (c) {
        case 's':
            if (cli->n_sets == MAX_SETS) {
                if (root) fprintf(stderr, "tptrain: more than %d --set options\n", MAX_SETS);
                return TP_EXIT_USAGE;
            }
            cli->sets[cli->n_sets++] = optarg;
            break;
        case 'n': cli->dry_run = true; break;
        case 'e': cli->eval_dir = optarg; break;
        case 'b': cli->bench = true; break;
        case 1: cli->eval.data = optarg; break;
        case 2: if (parse_int(optarg, "--batches", 1, &cli->eval.batches, root)) return TP_EXIT_USAGE; break;
        case 3:
            if (parse_int(optarg, "--generate", 1, &cli->eval.generate, root)) return TP_EXIT_USAGE;
            if (cli->eval.generate > EVAL_MAX_GENERATE) {
                if (root)
                    fprintf(stderr, "tptrain: --generate %s: at most %d tokens per run\n", optarg,
                            EVAL_MAX_GENERATE);
                return TP_EXIT_USAGE;
            }
            break;
        case 4:
            if (parse_double(optarg, "--temperature", &cli->eval.temperature, root)) return TP_EXIT_USAGE;
            break;
        case 5: if (parse_int(optarg, "--top-k", 1, &cli->eval.top_k, root)) return TP_EXIT_USAGE; break;
        case 6: {
            int s;
            if (parse_int(optarg, "--seed", 0, &s, root)) return TP_EXIT_USAGE;
            cli->eval.seed = (unsigned long long)s;
            cli->eval.seed_set = true;
            break;
        }
        case 7: cli->eval.prompt_tokens = optarg; break;
        case 8: cli->json_path = optarg; break;
        case 9: cli->eval.export_llmc = optarg; break;
        case 10: cli->eval.prompt_text = optarg; break;
        case 11:
            cli->format = optarg;
            if (text_parse_format(optarg, &cli->eval.format)) {
                if (root) fprintf(stderr, "tptrain: --format %s: expected text, ids or jsonl\n", optarg);
                return TP_EXIT_USAGE;
            }
            break;
        case 12: cli->encode_path = optarg; break;
        case 13: cli->eval.tokenizer = optarg; break;
        case 'h':
            if (root) fputs(usage_text, stdout);
            return TP_EXIT_OK;
        case 'V':
            if (root) printf("tptrain %s\n", TP_VERSION);
            return TP_EXIT_OK;
        default:
            if (isdigit((unsigned char)argv[optind - 1][1]) && cli->n_pos < MAX_SETS) {
                cli->pos[cli->n_pos++] = argv[optind - 1]; // a negative number: let the mode reject it
                break;
            }
            if (root) {
                const char *given = argv[optind - 1];
                bool known = false; // getopt leaves optopt set for a known option missing its value
                for (const struct option *o = opts; o->name && optopt; o++) known |= o->val == optopt;
                if (known) fprintf(stderr, "tptrain: option '%s' needs a value; see tptrain --help\n", given);
                else fprintf(stderr, "tptrain: unknown option '%s'; see tptrain --help\n", given);
            }
            return TP_EXIT_USAGE;
        }
    }
    if (!cli->bench && cli->n_pos > 1) {
        if (root) fprintf(stderr, "tptrain: unexpected argument '%s' (one config file at most); see tptrain --help\n", cli->pos[1]);
        return TP_EXIT_USAGE;
    }
    if (!cli->bench && cli->n_pos == 1) cli->config_path = cli->pos[0];
    return check_text_options(cli, root);
}

static int load_config(struct tp_config *cfg, const struct cli *cli, int world_size, char *err, size_t errlen) {
    config_defaults(cfg);
    int st = cli->config_path ? config_load_file(cfg, cli->config_path, err, errlen)
                              : config_load_string(cfg, config_default_yaml, strlen(config_default_yaml),
                                                   "<built-in tiny.yaml>", err, errlen);
    for (int i = 0; !st && i < cli->n_sets; i++) st = config_apply_set(cfg, cli->sets[i], err, errlen);
    if (!st) st = config_validate(cfg, world_size, err, errlen);
    return st;
}

static int run(int argc, char **argv, int rank, int world_size) {
    bool root = rank == 0;
    struct cli cli;
    int st = parse_cli(&cli, argc, argv, root);
    if (st >= 0) return st;
    st = 0;
    if (cli.eval_dir && cli.bench) {
        if (root) fprintf(stderr, "tptrain: --eval and --bench are separate modes; give one\n");
        return TP_EXIT_USAGE;
    }
    if (cli.encode_path) {
        if (!root) return 0;
        return text_encode_file(cli.encode_path, cli.eval.tokenizer ? cli.eval.tokenizer : TEXT_TOKENIZER_PATH,
                                cli.format ? cli.eval.format : TEXT_FORMAT_IDS);
    }
    if (cli.eval_dir) {
        if (cli.config_path) {
            if (root) fprintf(stderr, "tptrain: --eval takes its config from the checkpoint; drop '%s' (use --set to override keys)\n", cli.config_path);
            return TP_EXIT_USAGE;
        }
        cli.eval.checkpoint = cli.eval_dir;
        cli.eval.sets = cli.sets;
        cli.eval.n_sets = cli.n_sets;
        return eval_run(&cli.eval);
    }
    if (cli.bench) {
        struct bench_opts bo = {.argc = cli.n_pos, .argv = cli.pos,
                                .json_path = cli.json_path, .sets = cli.sets, .n_sets = cli.n_sets};
        return bench_run(&bo);
    }
    static struct tp_config cfg;
    char err[2048] = "";
    if (cli.dry_run) {
        // A dry run plans for the mesh the config asks for, even from a single process.
        int world = world_size;
        if (world == 1) {
            st = load_config(&cfg, &cli, 0, err, sizeof err);
            // both are bounded by the config (4096 and 65536), so the product fits an int
            long w = (long)cfg.parallel.tp * (cfg.parallel.dp > 0 ? cfg.parallel.dp : 1);
            world = w > INT_MAX ? INT_MAX : (int)w;
        }
        if (!st) st = load_config(&cfg, &cli, world, err, sizeof err);
        if (st) {
            if (root) fprintf(stderr, "tptrain: %s\n", err);
            return st;
        }
        return root ? train_dry_run(&cfg, world) : 0;
    }
    st = load_config(&cfg, &cli, world_size, err, sizeof err);
    if (st) {
        // Every rank read the same file and failed alike: one message from rank 0.
        if (root) fprintf(stderr, "tptrain: %s\n", err);
        return st;
    }
    return train_run(&cfg);
}

int main(int argc, char **argv) {
    int provided, rank = 0, world_size = 1;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    int code = run(argc, argv, rank, world_size);
    // Standard output carries --dry-run's plan, --help and generated text: output lost to a full
    // disk fails the run instead of exiting 0. stdio keeps no errno for a write that failed
    // inside an earlier printf, so only a failing final flush can name the reason.
    errno = 0;
    if ((fflush(stdout) != 0 || ferror(stdout)) && code == TP_EXIT_OK) {
        fprintf(stderr, "tptrain: standard output: %s; the output is incomplete\n",
                errno ? strerror(errno) : "a write failed (a full disk or a closed file)");
        code = TP_EXIT_RUNTIME;
    }
    MPI_Finalize();
    return code;
}
