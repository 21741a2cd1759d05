// test_tp.c: tp.h's mappings, parallel layers and cross-entropy on several ranks of the CPU
// backend. The checks live in tp_ranks.c, an MPI program run here under mpiexec (Criterion forks
// its tests, which MPI does not survive); each rank count must pass every one of them.
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define OUT_CAP 65536

// The checks tp_ranks.c prints on success; every one must appear, so a check that silently stops
// running fails the test.
static const char *const checks[] = {
    "ok copy_to_tp_region forward is the identity",
    "ok copy_to_tp_region backward sums over ranks",
    "ok reduce_from_tp_region forward sums over ranks",
    "ok reduce_from_tp_region backward is the identity",
    "ok gather_from_sequence_parallel_region forward assembles the rows in rank order",
    "ok gather_from_sequence_parallel_region backward reduce-scatters",
    "ok scatter_to_sequence_parallel_region forward keeps this rank's rows",
    "ok scatter_to_sequence_parallel_region backward all-gathers",
    "ok reduce_scatter_to_sequence_parallel_region forward sums and keeps this rank's rows",
    "ok reduce_scatter_to_sequence_parallel_region backward all-gathers",
    "ok gather_from_tp_region forward places each rank's columns",
    "ok row_parallel_linear forward (bias once, after the all-reduce) equals one rank",
    "ok column_parallel_linear backward input gradient (all-reduced) equals one rank",
    "ok column_parallel_linear weight and bias gradients are shards of one rank's",
    "ok row_parallel_linear weight gradient is a shard, bias gradient whole",
    "ok sequence parallel: row_parallel_linear forward (reduce-scattered) gives this rank's rows of one rank's",
    "ok sequence parallel: column_parallel_linear input gradient (reduce-scattered) is this rank's rows",
    "ok sequence parallel: weight gradients are shards, the row-parallel bias gradient whole",
    "ok vocab_parallel_embedding forward equals one rank (rows summed, positions added once)",
    "ok vocab_parallel_embedding backward: each rank's wte gradient is its rows",
    "ok sequence parallel: vocab_parallel_embedding forward (reduce-scattered, positions of the rank's rows) "
    "gives this rank's rows of one rank's",
    "ok sequence parallel: vocab_parallel_embedding backward (all-gathered) gives the wte rows and the whole wpe "
    "gradient",
    "ok vocab_parallel_cross_entropy forward equals one rank",
    "ok vocab_parallel_cross_entropy backward: this rank's columns of one rank's gradient",
    "ok vocab_parallel_lm_head_cross_entropy in chunks equals the unfused layers on one rank",
    "ok vocab_parallel_lm_head_cross_entropy: chunks change no loss or input gradient bit",
    "ok vocab_parallel_lm_head_cross_entropy: chunks change the weight gradient by its sum order only",
    "ok sequence parallel: vocab_parallel_lm_head_cross_entropy in chunks (input all-gathered, its gradient "
    "reduce-scattered) gives this rank's rows of one rank's",
    "ok reduce_scatter_to_sequence_parallel_region forward sums bf16 values",
};

static const char *const one_rank_check =
    "ok vocab_parallel_lm_head_cross_entropy in one chunk on one rank is the unfused layers bit for bit";

static void run_ranks(int np) {
    tu_require_mpiexec();
    const char *build = getenv("TP_BUILD_ROOT");
    cr_assert(build && *build, "TP_BUILD_ROOT is not set (run through meson test)");
    char *out = malloc(OUT_CAP);
    int rc = tu_run(out, OUT_CAP, "timeout 120 '%s' %s -np %d '%s/tests/tp_ranks'", tu_mpiexec(), tu_mpiexec_flags(),
                    np, build);
    cr_assert_eq(rc, 0, "tp_ranks on %d ranks exited %d:\n%s", np, rc, out);
    for (size_t i = 0; i < sizeof checks / sizeof checks[0]; i++)
        cr_expect(strstr(out, checks[i]) != NULL, "%d ranks: missing '%s' in:\n%s", np, checks[i], out);
    if (np == 1) // one rank, one chunk: the fused head is the unfused layers op for op
        cr_expect(strstr(out, one_rank_check) != NULL, "missing '%s' in:\n%s", one_rank_check, out);
    char summary[64];
    snprintf(summary, sizeof summary, "0 checks failed on %d ranks", np);
    cr_expect(strstr(out, summary) != NULL, "%s", out);
    free(out);
}

Test(tp, one_rank) { run_ranks(1); }
Test(tp, two_ranks) { run_ranks(2); }
Test(tp, three_ranks) { run_ranks(3); }
Test(tp, four_ranks) { run_ranks(4); }
