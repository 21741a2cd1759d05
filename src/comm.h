// comm.h: collectives over one process group (one dimension of the device mesh).
//
// Two implementations sit behind one struct of function pointers: MPI (comm_mpi.c; works for host
// buffers and, staging through host memory, for device buffers) and NCCL (cuda/comm_nccl.c; device
// buffers, ordered on the backend's stream). Callers never know which one they hold.
// Buffers are backend memory of the backend the comm was created with.
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "backend.h"

enum comm_op { COMM_SUM = 0, COMM_MAX, COMM_AVG };
enum comm_dtype { COMM_F32 = 0, COMM_BF16, COMM_I32, COMM_U8, COMM_F64, COMM_I64, COMM_U64 };

struct comm_i {
    const char *(*name)(void *ctx);   // "mpi", "nccl", "self"
    // buf (count) = op over ranks of buf, in place
    void (*all_reduce)(void *ctx, void *buf, size_t count, enum comm_dtype dt, enum comm_op op);
    // out (size * count) = concatenation of every rank's in (count), rank order
    void (*all_gather)(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt);
    // out (count) = this rank's block of op over ranks of in (size * count)
    void (*reduce_scatter)(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt,
                           enum comm_op op);
    // buf (count) = root's buf
    void (*broadcast)(void *ctx, void *buf, size_t count, enum comm_dtype dt, int root);
    // waits until every collective issued so far has completed (and checks for async errors)
    void (*synchronize)(void *ctx);

    // (optional) Nonblocking forms of the three above, for communication that overlaps the
    // backend's work (the DP gradient buckets). Each starts after every op queued on the backend
    // so far and may still be running when it returns: its buffers belong to the comm until
    // `wait`. NULL: the comm_*_start helpers below run the blocking form instead.
    void (*all_reduce_start)(void *ctx, void *buf, size_t count, enum comm_dtype dt, enum comm_op op);
    void (*reduce_scatter_start)(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt,
                                 enum comm_op op);
    void (*all_gather_start)(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt);
    // (optional) every *_start issued so far completes before any op queued on the backend after
    // this call (NCCL: a stream dependency, the host does not wait; MPI: the host waits)
    void (*wait)(void *ctx);

    // Host-memory collectives, whatever memory the device ones take: small values such as timings,
    // flags, hashes, sampled tokens and checkpoint shards. Blocking; they do not wait for the
    // backend's queue.
    // buf (count) = op over ranks of buf, in place
    void (*host_all_reduce)(void *ctx, void *buf, size_t count, enum comm_dtype dt, enum comm_op op);
    // out (size * count) = every rank's in (count), rank order
    void (*host_all_gather)(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt);
    // on root, out (size * count) = every rank's in (count), rank order; out unused elsewhere
    void (*host_gather)(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt, int root);
    // buf (count) = root's buf
    void (*host_broadcast)(void *ctx, void *buf, size_t count, enum comm_dtype dt, int root);
    // returns once every rank of the group has called it
    void (*barrier)(void *ctx);

    void (*destroy)(void *ctx);
};

struct comm {
    const struct comm_i *iface;
    void *ctx;
    int rank;  // rank inside this group
    int size;  // ranks in this group
};

size_t comm_dtype_size(enum comm_dtype dt);

// MPI implementation over an MPI communicator (passed as a pointer to MPI_Comm to keep mpi.h out
// of this header). be says where the buffers live; device buffers are staged through host memory.
struct comm comm_mpi_create(const void *mpi_comm, struct backend be);

// NCCL implementation (GPU builds only). Bootstraps its unique id inside mpi_comm.
// Returns false with a message in err on failure.
bool comm_nccl_available(void);
bool comm_nccl_create(struct comm *out, const void *mpi_comm, struct backend be, char *err,
                      size_t errlen);

static inline void comm_all_reduce(struct comm *c, float *buf, size_t n, enum comm_op op) {
    if (c->size > 1) c->iface->all_reduce(c->ctx, buf, n, COMM_F32, op);
}

// The same for a compute-type tensor (fp32 or bf16; bf16 is summed as bf16 by NCCL and in fp32 by
// the MPI comm, which widens it on the host).
static inline void comm_all_reduce_compute(struct comm *c, void *buf, size_t n, enum tp_dtype t,
                                           enum comm_op op) {
    if (c->size > 1) c->iface->all_reduce(c->ctx, buf, n, t == TP_DTYPE_BF16 ? COMM_BF16 : COMM_F32, op);
}

// The nonblocking collectives (see comm_i): the buffers are the comm's until comm_wait. In place
// as NCCL allows: reduce_scatter's out may be in + rank * count, all_gather's in may be
// out + rank * count. Comms without them run the blocking form.
static inline void comm_all_reduce_start(struct comm *c, void *buf, size_t n, enum comm_dtype dt, enum comm_op op) {
    if (c->size == 1) return;
    if (c->iface->all_reduce_start) c->iface->all_reduce_start(c->ctx, buf, n, dt, op);
    else c->iface->all_reduce(c->ctx, buf, n, dt, op);
}

static inline void comm_reduce_scatter_start(struct comm *c, void *out, const void *in, size_t n, enum comm_dtype dt,
                                             enum comm_op op) {
    if (c->iface->reduce_scatter_start) c->iface->reduce_scatter_start(c->ctx, out, in, n, dt, op);
    else c->iface->reduce_scatter(c->ctx, out, in, n, dt, op);
}

static inline void comm_all_gather_start(struct comm *c, void *out, const void *in, size_t n, enum comm_dtype dt) {
    if (c->iface->all_gather_start) c->iface->all_gather_start(c->ctx, out, in, n, dt);
    else c->iface->all_gather(c->ctx, out, in, n, dt);
}

// Orders the backend's later work after every collective started so far.
static inline void comm_wait(struct comm *c) {
    if (c->iface->wait) c->iface->wait(c->ctx);
}

// Waits for the group's collectives; on NCCL this polls for asynchronous errors, so a failed peer
// ends the run with a message instead of a host copy blocked forever behind a stuck collective.
static inline void comm_synchronize(struct comm *c) {
    if (c->size > 1) c->iface->synchronize(c->ctx);
}

static inline void comm_host_all_reduce(const struct comm *c, void *buf, size_t n, enum comm_dtype dt,
                                        enum comm_op op) {
    c->iface->host_all_reduce(c->ctx, buf, n, dt, op);
}

static inline void comm_host_all_gather(const struct comm *c, void *out, const void *in, size_t n, enum comm_dtype dt) {
    c->iface->host_all_gather(c->ctx, out, in, n, dt);
}

static inline void comm_host_gather(const struct comm *c, void *out, const void *in, size_t n, enum comm_dtype dt,
                                    int root) {
    c->iface->host_gather(c->ctx, out, in, n, dt, root);
}

static inline void comm_host_broadcast(const struct comm *c, void *buf, size_t n, enum comm_dtype dt, int root) {
    c->iface->host_broadcast(c->ctx, buf, n, dt, root);
}

static inline void comm_barrier(const struct comm *c) { c->iface->barrier(c->ctx); }

static inline void comm_destroy(struct comm *c) {
    if (c->iface && c->iface->destroy) c->iface->destroy(c->ctx);
    c->iface = NULL;
}
