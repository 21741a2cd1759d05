// bench.c: placeholder until --bench lands.
#include <stdio.h>

#include "bench.h"
#include "common.h"

int bench_run(const struct bench_opts *o) {
    (void)o;
    fprintf(stderr, "tptrain: --bench is not built yet in this version\n");
    return TP_EXIT_USAGE;
}
