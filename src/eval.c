// eval.c: placeholder until --eval lands.
#include <stdio.h>

#include "common.h"
#include "eval.h"

int eval_run(const struct eval_opts *o) {
    (void)o;
    fprintf(stderr, "tptrain: --eval is not built yet in this version\n");
    return TP_EXIT_USAGE;
}
