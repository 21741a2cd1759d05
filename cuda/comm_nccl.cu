// comm_nccl.cu: the NCCL implementation of struct comm_i (src/comm.h).
//
// One NCCL communicator per process group. Its unique id is made by rank 0 of the group's own MPI
// communicator and broadcast inside that communicator (never MPI_COMM_WORLD), so every dimension
// of the device mesh gets its own NCCL group. Collectives are enqueued on the backend's stream,
// ordered with the kernels around them. synchronize polls the stream and NCCL's asynchronous
// error state together, so a peer that dies ends this rank with a message instead of a hang.
#include <cuda_runtime.h>
// Open MPI's deprecated C++ bindings are not wanted (and warn under -Wextra).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#include <nccl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "cuda_common.cuh"

extern "C" {
#include "backend.h"
#include "comm.h"
}

// ---- context and checks

struct nccl_ctx {
    ncclComm_t comm;
    cudaStream_t stream; // the backend's stream
    int device;          // the device the stream (and so the communicator) lives on
    int rank, size;      // inside this group
    struct comm host;    // MPI comm over the same group: the host-memory collectives
    // The overlap stream, created by the first nonblocking collective. From then on every
    // collective of this communicator runs there (NCCL does not allow one communicator on two
    // streams at once), after an event on the backend's stream; blocking ones are joined at once.
    cudaStream_t side;
    cudaEvent_t queued;  // recorded on the backend's stream: what a collective waits for
    cudaEvent_t done;    // recorded on the side stream: what the backend's stream waits for
    int in_flight;       // nonblocking collectives started and not yet joined
    struct backend be;   // told of them (backend_i.overlap)
};

// Aborting the communicator releases kernels that wait on dead peers, so the process can exit.
static _Noreturn void nccl_fail(struct nccl_ctx *c, ncclResult_t r, const char *what,
                                const char *file, int line) {
    char detail[512];
    const char *last = ncclGetLastError(c ? c->comm : NULL);
    snprintf(detail, sizeof detail, "%s", last ? last : "");
    if (c) ncclCommAbort(c->comm);
    tp_die(TP_EXIT_RUNTIME,
           "%s:%d: NCCL error %d (%s) in %s on rank %d of %d%s%s; a peer may have failed first (read "
           "the other ranks' messages), rerun with NCCL_DEBUG=WARN for details",
           file, line, (int)r, ncclGetErrorString(r), what, c ? c->rank : -1, c ? c->size : -1,
           detail[0] ? ": " : "", detail);
}
#define NCCL_CHECK(c, call)                                                 \
    do {                                                                    \
        ncclResult_t r_ = (call);                                           \
        if (r_ != ncclSuccess) nccl_fail((c), r_, #call, __FILE__, __LINE__); \
    } while (0)

static ncclDataType_t nccl_dtype(enum comm_dtype dt) {
    switch (dt) {
    case COMM_F32: return ncclFloat32;
    case COMM_BF16: return ncclBfloat16;
    case COMM_I32: return ncclInt32;
    case COMM_U8: return ncclUint8;
    case COMM_F64: return ncclFloat64;
    case COMM_I64: return ncclInt64;
    case COMM_U64: return ncclUint64;
    }
    tp_die(TP_EXIT_RUNTIME, "comm_nccl: unknown comm_dtype %d (a caller passed a bad value)", (int)dt);
}

static ncclRedOp_t nccl_op(enum comm_op op) {
    switch (op) {
    case COMM_SUM: return ncclSum;
    case COMM_MAX: return ncclMax;
    case COMM_AVG: return ncclAvg;
    }
    tp_die(TP_EXIT_RUNTIME, "comm_nccl: unknown comm_op %d (a caller passed a bad value)", (int)op);
}

static struct nccl_ctx *ctx_of(void *ctx) {
    struct nccl_ctx *c = (struct nccl_ctx *)ctx;
    CUDA_CHECK(cudaSetDevice(c->device));
    return c;
}

// ---- streams
//
// Without the side stream a collective runs on the backend's stream, in line with the kernels.
// With it, issue_stream makes the side stream wait for everything queued on the backend's stream
// so far and returns it; join makes the backend's stream wait for the side stream.

static void make_side_stream(struct nccl_ctx *c) {
    if (c->side) return;
    int lo = 0, hi = 0; // communication first: its kernels should not queue behind a long backward
    CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
    CUDA_CHECK(cudaStreamCreateWithPriority(&c->side, cudaStreamNonBlocking, hi));
    CUDA_CHECK(cudaEventCreateWithFlags(&c->queued, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&c->done, cudaEventDisableTiming));
}

static cudaStream_t issue_stream(struct nccl_ctx *c) {
    if (!c->side) return c->stream;
    CUDA_CHECK(cudaEventRecord(c->queued, c->stream));
    CUDA_CHECK(cudaStreamWaitEvent(c->side, c->queued, 0));
    return c->side;
}

static void join(struct nccl_ctx *c) {
    if (!c->side) return;
    CUDA_CHECK(cudaEventRecord(c->done, c->side));
    CUDA_CHECK(cudaStreamWaitEvent(c->stream, c->done, 0));
    if (c->in_flight && c->be.iface->overlap) c->be.iface->overlap(c->be.ctx, -c->in_flight);
    c->in_flight = 0;
}

// A nonblocking collective goes on the side stream; the backend hears that it runs beside it.
static void begin_nonblocking(struct nccl_ctx *c) {
    make_side_stream(c);
    c->in_flight++;
    if (c->be.iface->overlap) c->be.iface->overlap(c->be.ctx, 1);
}

// ---- collectives

static const char *nccl_name(void *ctx) {
    (void)ctx;
    return "nccl";
}

static void all_reduce_on(struct nccl_ctx *c, void *buf, size_t count, enum comm_dtype dt,
                          enum comm_op op) {
    if (count == 0) return; // count is the same on every rank, so all skip together
    NCCL_CHECK(c, ncclAllReduce(buf, buf, count, nccl_dtype(dt), nccl_op(op), c->comm,
                                issue_stream(c)));
}

static void all_gather_on(struct nccl_ctx *c, void *out, const void *in, size_t count,
                          enum comm_dtype dt) {
    if (count == 0) return;
    NCCL_CHECK(c, ncclAllGather(in, out, count, nccl_dtype(dt), c->comm, issue_stream(c)));
}

static void reduce_scatter_on(struct nccl_ctx *c, void *out, const void *in, size_t count,
                              enum comm_dtype dt, enum comm_op op) {
    if (count == 0) return;
    NCCL_CHECK(c, ncclReduceScatter(in, out, count, nccl_dtype(dt), nccl_op(op), c->comm,
                                    issue_stream(c)));
}

static void nccl_all_reduce(void *ctx, void *buf, size_t count, enum comm_dtype dt,
                            enum comm_op op) {
    struct nccl_ctx *c = ctx_of(ctx);
    all_reduce_on(c, buf, count, dt, op);
    join(c);
}

static void nccl_all_gather(void *ctx, void *out, const void *in, size_t count,
                            enum comm_dtype dt) {
    struct nccl_ctx *c = ctx_of(ctx);
    all_gather_on(c, out, in, count, dt);
    join(c);
}

static void nccl_reduce_scatter(void *ctx, void *out, const void *in, size_t count,
                                enum comm_dtype dt, enum comm_op op) {
    struct nccl_ctx *c = ctx_of(ctx);
    reduce_scatter_on(c, out, in, count, dt, op);
    join(c);
}

static void nccl_broadcast(void *ctx, void *buf, size_t count, enum comm_dtype dt, int root) {
    struct nccl_ctx *c = ctx_of(ctx);
    if (count == 0) return;
    if (root < 0 || root >= c->size)
        tp_die(TP_EXIT_RUNTIME, "comm_nccl: broadcast root %d outside the group of %d", root,
               c->size);
    NCCL_CHECK(c, ncclBroadcast(buf, buf, count, nccl_dtype(dt), root, c->comm, issue_stream(c)));
    join(c);
}

// The nonblocking forms: the same collectives on the side stream, joined by nccl_wait.
static void nccl_all_reduce_start(void *ctx, void *buf, size_t count, enum comm_dtype dt,
                                  enum comm_op op) {
    struct nccl_ctx *c = ctx_of(ctx);
    begin_nonblocking(c);
    all_reduce_on(c, buf, count, dt, op);
}

static void nccl_reduce_scatter_start(void *ctx, void *out, const void *in, size_t count,
                                      enum comm_dtype dt, enum comm_op op) {
    struct nccl_ctx *c = ctx_of(ctx);
    begin_nonblocking(c);
    reduce_scatter_on(c, out, in, count, dt, op);
}

static void nccl_all_gather_start(void *ctx, void *out, const void *in, size_t count,
                                  enum comm_dtype dt) {
    struct nccl_ctx *c = ctx_of(ctx);
    begin_nonblocking(c);
    all_gather_on(c, out, in, count, dt);
}

static void nccl_wait(void *ctx) { join(ctx_of(ctx)); }

static void check_async(struct nccl_ctx *c) {
    ncclResult_t ar = ncclSuccess;
    NCCL_CHECK(c, ncclCommGetAsyncError(c->comm, &ar));
    if (ar != ncclSuccess && ar != ncclInProgress)
        nccl_fail(c, ar, "a collective (asynchronous error)", __FILE__, __LINE__);
}

// A blocking cudaStreamSynchronize would hang forever on a collective whose peer died; polling
// lets NCCL's asynchronous error reach us. Yield first (collectives usually finish in
// microseconds), then sleep so a long wait does not burn a core.
static void nccl_synchronize(void *ctx) {
    struct nccl_ctx *c = ctx_of(ctx);
    join(c); // the side stream's collectives, if any, through the backend's stream
    for (long polls = 0;; polls++) {
        cudaError_t e = cudaStreamQuery(c->stream);
        if (e == cudaSuccess) break;
        if (e != cudaErrorNotReady) CUDA_CHECK(e);
        check_async(c);
        if (polls < 20000) {
            sched_yield();
        } else {
            struct timespec ts = {0, 100000}; // 100 us
            nanosleep(&ts, NULL);
        }
    }
    check_async(c);
}

// ---- host collectives: host memory is MPI's business, on the same group

static void nccl_host_all_reduce(void *ctx, void *buf, size_t count, enum comm_dtype dt,
                                 enum comm_op op) {
    comm_host_all_reduce(&((struct nccl_ctx *)ctx)->host, buf, count, dt, op);
}

static void nccl_host_all_gather(void *ctx, void *out, const void *in, size_t count,
                                 enum comm_dtype dt) {
    comm_host_all_gather(&((struct nccl_ctx *)ctx)->host, out, in, count, dt);
}

static void nccl_host_gather(void *ctx, void *out, const void *in, size_t count,
                             enum comm_dtype dt, int root) {
    comm_host_gather(&((struct nccl_ctx *)ctx)->host, out, in, count, dt, root);
}

static void nccl_host_broadcast(void *ctx, void *buf, size_t count, enum comm_dtype dt,
                                int root) {
    comm_host_broadcast(&((struct nccl_ctx *)ctx)->host, buf, count, dt, root);
}

static void nccl_barrier(void *ctx) { comm_barrier(&((struct nccl_ctx *)ctx)->host); }

static void nccl_destroy(void *ctx) {
    struct nccl_ctx *c = (struct nccl_ctx *)ctx;
    nccl_synchronize(c);
    NCCL_CHECK(c, ncclCommDestroy(c->comm));
    if (c->side) {
        CUDA_CHECK(cudaEventDestroy(c->queued));
        CUDA_CHECK(cudaEventDestroy(c->done));
        CUDA_CHECK(cudaStreamDestroy(c->side));
    }
    comm_destroy(&c->host);
    free(c);
}

static const struct comm_i nccl_iface = {
    .name = nccl_name,
    .all_reduce = nccl_all_reduce,
    .all_gather = nccl_all_gather,
    .reduce_scatter = nccl_reduce_scatter,
    .broadcast = nccl_broadcast,
    .synchronize = nccl_synchronize,
    .all_reduce_start = nccl_all_reduce_start,
    .reduce_scatter_start = nccl_reduce_scatter_start,
    .all_gather_start = nccl_all_gather_start,
    .wait = nccl_wait,
    .host_all_reduce = nccl_host_all_reduce,
    .host_all_gather = nccl_host_all_gather,
    .host_gather = nccl_host_gather,
    .host_broadcast = nccl_host_broadcast,
    .barrier = nccl_barrier,
    .destroy = nccl_destroy,
};

// ---- public entry points

extern "C" bool comm_nccl_available(void) { return backend_cuda_device_count() > 0; }

static bool mpi_failed(int rc, const char *call, char *err, size_t errlen) {
    if (rc == MPI_SUCCESS) return false;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof msg, "code %d", rc);
    snprintf(err, errlen, "%s failed while bootstrapping NCCL: %s", call, msg);
    return true;
}

extern "C" bool comm_nccl_create(struct comm *out, const void *mpi_comm, struct backend be,
                                 char *err, size_t errlen) {
    out->iface = NULL;
    out->ctx = NULL;
    out->rank = 0;
    out->size = 0;
    if (!mpi_comm) {
        snprintf(err, errlen, "comm_nccl_create: no MPI communicator given");
        return false;
    }
    void *stream = be.iface && be.iface->native_stream ? be.iface->native_stream(be.ctx) : NULL;
    if (!stream) {
        snprintf(err, errlen, "NCCL needs the CUDA backend (it runs on its stream); the backend "
                 "'%s' has none: use comm: mpi", be.iface && be.iface->name ? be.iface->name(be.ctx)
                                                                          : "?");
        return false;
    }
    MPI_Comm mc = *(const MPI_Comm *)mpi_comm;
    int rank = 0, size = 0;
    if (mpi_failed(MPI_Comm_rank(mc, &rank), "MPI_Comm_rank", err, errlen)) return false;
    if (mpi_failed(MPI_Comm_size(mc, &size), "MPI_Comm_size", err, errlen)) return false;

    // NCCL binds the communicator to the current device: make it the stream's.
    int device = 0;
    cudaError_t e = cudaStreamGetDevice((cudaStream_t)stream, &device);
    if (e == cudaSuccess) e = cudaSetDevice(device);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        snprintf(err, errlen, "cannot select the backend's CUDA device for NCCL: %s",
                 cudaGetErrorString(e));
        return false;
    }

    // Rank 0 sends its status with the id, so that a failure there fails every rank alike.
    struct {
        int status;
        ncclUniqueId id;
    } boot;
    memset(&boot, 0, sizeof boot);
    if (rank == 0) boot.status = (int)ncclGetUniqueId(&boot.id);
    if (mpi_failed(MPI_Bcast(&boot, (int)sizeof boot, MPI_BYTE, 0, mc), "MPI_Bcast", err, errlen))
        return false;
    if (boot.status != (int)ncclSuccess) {
        snprintf(err, errlen, "rank 0 of the group could not create the NCCL unique id: %s "
                 "(rerun with NCCL_DEBUG=WARN; NCCL needs a working network interface, e.g. "
                 "NCCL_SOCKET_IFNAME=lo on one node)", ncclGetErrorString((ncclResult_t)boot.status));
        return false;
    }

    ncclComm_t comm = NULL;
    ncclResult_t r = ncclCommInitRank(&comm, size, boot.id, rank);
    // Agree on the outcome so that no rank goes on with a communicator its peers lack.
    int ok = r == ncclSuccess, all_ok = 0;
    if (mpi_failed(MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, mc), "MPI_Allreduce", err,
                   errlen)) {
        if (comm && r == ncclSuccess) ncclCommAbort(comm);
        return false;
    }
    if (!all_ok) {
        if (r == ncclSuccess) {
            ncclCommAbort(comm);
            snprintf(err, errlen, "ncclCommInitRank failed on another rank of the group of %d", size);
        } else {
            const char *last = ncclGetLastError(NULL);
            if (!last) last = "";
            snprintf(err, errlen, "ncclCommInitRank failed on rank %d of %d: %s%s%s", rank, size,
                     ncclGetErrorString(r), last[0] ? ": " : "", last);
        }
        return false;
    }

    struct nccl_ctx *c = (struct nccl_ctx *)tp_calloc(1, sizeof *c);
    c->comm = comm;
    c->stream = (cudaStream_t)stream;
    c->device = device;
    c->rank = rank;
    c->size = size;
    c->host = comm_mpi_create(mpi_comm, be);
    c->be = be;
    int nrank = -1, ncount = -1;
    NCCL_CHECK(c, ncclCommUserRank(comm, &nrank));
    NCCL_CHECK(c, ncclCommCount(comm, &ncount));
    if (nrank != rank || ncount != size)
        tp_die(TP_EXIT_RUNTIME, "comm_nccl: NCCL rank %d of %d disagrees with MPI rank %d of %d",
               nrank, ncount, rank, size);
    out->iface = &nccl_iface;
    out->ctx = c;
    out->rank = rank;
    out->size = size;
    return true;
}
