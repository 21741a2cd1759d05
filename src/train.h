// train.h: the training loop (train mode) and the --dry-run report.
#pragma once

#include "config.h"
#include "data.h"
#include "mesh.h"
#include "model.h"

// Runs training under MPI (MPI_Init already done). cfg is validated for the world size.
// Returns the process exit code (0, 1 runtime failure, 2 bad input); every rank returns the same.
int train_run(const struct tp_config *cfg);

// Prints the resolved config, the mesh, every parameter's global and per-rank shape and layout,
// and the per-rank memory estimate for a world of world_size ranks. Returns 0.
int train_dry_run(const struct tp_config *cfg, int world_size);

// Model FLOPs per token (6N + 6*L*C*T, N = parameters counted once), as llm.c counts them.
double train_flops_per_token(const struct tp_config *cfg);

// ---- pieces --eval shares with training

// Agrees on status across all ranks and prints err once (on the lowest rank that failed; every
// rank passes its own message or NULL). Returns the largest status of any rank.
int train_agree(const struct mesh *mesh, int status, const char *err);

// mesh_init, then the backend and the per-dimension comms that cfg asks for. On failure the
// message is printed once and the agreed exit code returned; train_close_mesh cleans up either way.
int train_open_mesh(const struct tp_config *cfg, struct mesh *mesh, struct backend *be);
void train_close_mesh(struct mesh *mesh, struct backend *be);

// Mean loss per token over `batches` micro-batches of dl from its first one, averaged over the DP
// group: the figure the training loop logs as the validation loss. Collective; 0 or the agreed
// exit code (message printed).
int train_val_loss(struct model *m, struct mesh *mesh, struct data_loader *dl, int batches, double *loss);
