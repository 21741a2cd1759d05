// mesh.h: the 2-D device mesh (dp, tp) over MPI ranks, row-major with tp fastest.
//
// Ranks 0..tp-1 form TP group 0, so a TP group stays inside one node when ranks are placed
// node by node. Each mesh dimension has its own MPI sub-communicator; the comm objects built on
// top of them (MPI or NCCL) live in struct mesh too, so model code only ever sees mesh->tp and
// mesh->dp.
#pragma once

#include <mpi.h>
#include <stdbool.h>

#include "backend.h"
#include "comm.h"
#include "config.h"

struct mesh {
    int world_rank, world_size;
    int dp_size;
    int dp_rank;              // this rank's DP coordinate; its TP size and rank are tp.size, tp.rank
    int local_rank, local_size; // among the ranks of this node
    MPI_Comm world;           // MPI_COMM_WORLD
    MPI_Comm tp_comm;         // ranks with the same dp_rank
    MPI_Comm dp_comm;         // ranks with the same TP rank
    int device;               // CUDA device ordinal, -1 on the CPU backend
    bool gpu_shared;          // some node runs more ranks than it has GPUs
    struct comm tp;           // collectives over tp_comm
    struct comm dp;           // collectives over dp_comm
};

// The compute type train.precision asks for (fp32 master weights and optimiser state either way).
static inline enum tp_dtype mesh_compute_dtype(const struct tp_config *cfg) {
    return cfg->train.precision == TP_PREC_BF16 ? TP_DTYPE_BF16 : TP_DTYPE_F32;
}

// Splits MPI_COMM_WORLD into the (dp, tp) mesh. cfg must be validated for this world size.
void mesh_init(struct mesh *m, const struct tp_config *cfg);

// Picks the backend from parallel.device (auto: CUDA when built in and a GPU is present) and the
// GPU (local rank mod device count), in the compute type of train.precision. On a usage error
// (e.g. device: cuda without a GPU) writes err and returns TP_EXIT_USAGE; the result is agreed
// across all ranks.
int mesh_create_backend(struct mesh *m, const struct tp_config *cfg, struct backend *be, char *err,
                        size_t errlen);

// Builds m->tp and m->dp on the chosen backend (parallel.comm: auto picks NCCL when every rank
// has its own GPU, else MPI with a one-line notice). Returns 0 or TP_EXIT_USAGE with err set.
int mesh_create_comms(struct mesh *m, const struct tp_config *cfg, struct backend be, char *err,
                      size_t errlen);

// Collective agreement on an error: every rank passes its status (0 = fine) and gets back the
// largest status of any rank, so no rank goes on into a collective that a failed peer never joins.
int mesh_agree(const struct mesh *m, int status);

// mesh_agree, and the lowest world rank whose status was not 0 in *first (world_size if none):
// ranks usually fail alike, so that one rank speaks for all.
int mesh_agree_first(const struct mesh *m, int status, int *first);

// This process's place in MPI_COMM_WORLD, before any mesh exists (mode entry points); either
// pointer may be NULL.
void mesh_world(int *rank, int *size);

// The bitwise OR of every rank's bits (flags that any one rank may raise, e.g. "stop now").
int mesh_any_bits(const struct mesh *m, int bits);

// Ends every rank: prints msg (if non-NULL) and aborts the MPI job with code.
_Noreturn void mesh_abort(const struct mesh *m, int code, const char *msg);

void mesh_destroy(struct mesh *m);
