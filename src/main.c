// main.c: the tptrain command line: train (default), --dry-run, --eval, --bench.
#include <getopt.h>
#include <mpi.h>
#include <stdio.h>
#include <string.h>

#include "common.h"
#include "config.h"
#include "train.h"

#define MAX_SETS 256

static const char usage_text[] =
    "usage:\n"
    "  tptrain [CONFIG.yaml] [--set KEY=VALUE]... [--dry-run]\n"
    "      Train the model the config describes (the built-in configs/tiny.yaml when no file is\n"
    "      given). Run under mpirun/srun for tensor and data parallelism:\n"
    "        mpirun -np 4 tptrain configs/tiny.yaml --set parallel.tp=2\n"
    "  tptrain --eval CHECKPOINT_DIR [--data GLOB] [--batches N]\n"
    "      Evaluate a checkpoint's validation loss.\n"
    "  tptrain --bench layer M K N | allreduce SIZES... | model CONFIG.yaml\n"
    "      Benchmark parallel layers, the all-reduce, or one training step.\n"
    "\n"
    "options:\n"
    "  -s, --set KEY=VALUE   override one config key (e.g. --set train.lr=3e-4); repeatable\n"
    "  -n, --dry-run         validate the config; print it resolved, the mesh, every parameter's\n"
    "                        global and per-rank shape and layout, and per-rank memory; exit\n"
    "  -e, --eval DIR        evaluation mode\n"
    "  -b, --bench           benchmark mode\n"
    "  -h, --help            this text\n"
    "  -V, --version         print the version\n"
    "\n"
    "exit codes: 0 success, 1 runtime failure, 2 usage, config or input error\n";

struct cli {
    const char *config_path;
    const char *sets[MAX_SETS];
    int n_sets;
    bool dry_run;
    const char *eval_dir;
    bool bench;
    int first_positional; // index into argv after option parsing
};

// Parses argv; returns -1 to continue, or an exit code.
static int parse_cli(struct cli *cli, int argc, char **argv, bool root) {
    static const struct option opts[] = {
        {"set", required_argument, NULL, 's'},    {"dry-run", no_argument, NULL, 'n'},
        {"eval", required_argument, NULL, 'e'},   {"bench", no_argument, NULL, 'b'},
        {"help", no_argument, NULL, 'h'},         {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    memset(cli, 0, sizeof *cli);
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "+s:ne:bhV", opts, NULL)) != -1 || optind < argc) {
        if (c == -1) { // a positional argument; keep scanning options after it
            if (!cli->config_path && !cli->bench) cli->config_path = argv[optind];
            else if (!cli->bench) {
                if (root) fprintf(stderr, "tptrain: unexpected argument '%s' (one config file at most); see tptrain --help\n", argv[optind]);
                return TP_EXIT_USAGE;
            }
            if (cli->bench) break; // the bench arguments follow
            optind++;
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
        case 'h':
            if (root) fputs(usage_text, stdout);
            return TP_EXIT_OK;
        case 'V':
            if (root) printf("tptrain %s\n", TP_VERSION);
            return TP_EXIT_OK;
        default:
            if (root) {
                if (optopt) fprintf(stderr, "tptrain: option -%c needs an argument or is unknown; see tptrain --help\n", optopt);
                else fprintf(stderr, "tptrain: unknown option '%s'; see tptrain --help\n", argv[optind - 1]);
            }
            return TP_EXIT_USAGE;
        }
    }
    cli->first_positional = optind;
    return -1;
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
    if (cli.eval_dir) {
        if (root) fprintf(stderr, "tptrain: --eval is not built yet in this version\n");
        return TP_EXIT_USAGE;
    }
    if (cli.bench) {
        if (root) fprintf(stderr, "tptrain: --bench is not built yet in this version\n");
        return TP_EXIT_USAGE;
    }
    static struct tp_config cfg;
    char err[2048] = "";
    if (cli.dry_run) {
        // A dry run plans for the mesh the config asks for, even from a single process.
        int world = world_size;
        if (world == 1) {
            st = load_config(&cfg, &cli, 0, err, sizeof err);
            world = cfg.parallel.tp * (cfg.parallel.dp > 0 ? cfg.parallel.dp : 1);
        }
        if (!st) st = load_config(&cfg, &cli, world, err, sizeof err);
        if (st) {
            if (root) fprintf(stderr, "%s\n", err);
            return st;
        }
        return root ? train_dry_run(&cfg, world) : 0;
    }
    st = load_config(&cfg, &cli, world_size, err, sizeof err);
    if (st) {
        // Every rank read the same file and failed alike: one message from rank 0.
        if (root) fprintf(stderr, "%s\n", err);
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
    fflush(stdout);
    MPI_Finalize();
    return code;
}
