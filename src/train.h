// train.h: the training loop (train mode) and the --dry-run report.
#pragma once

#include "config.h"

// Runs training under MPI (MPI_Init already done). cfg is validated for the world size.
// Returns the process exit code (0, 1 runtime failure, 2 bad input); every rank returns the same.
int train_run(const struct tp_config *cfg);

// Prints the resolved config, the mesh, every parameter's global and per-rank shape and layout,
// and the per-rank memory estimate for a world of world_size ranks. Returns 0.
int train_dry_run(const struct tp_config *cfg, int world_size);

// Model FLOPs per token (6N + 6*L*C*T, N = parameters counted once), as llm.c counts them.
double train_flops_per_token(const struct tp_config *cfg);
