// comm_mpi.c: the comm interface on MPI.
//
// Host buffers go straight to MPI. Device buffers (a backend that is not host-accessible, e.g.
// several ranks sharing one GPU, where NCCL refuses to run) are staged through a host buffer:
// wait for the backend's queue, copy down, run the MPI collective, copy back up.
#include <limits.h>
#include <math.h>
#include <mpi.h>
#include <string.h>

#include "comm.h"
#include "common.h"

// A started nonblocking collective: MPI works on host buffers `send` and `recv` (owned ones are
// freed at completion), and completion moves `recv` to `dst` (another host buffer or device
// memory) after dividing `avg` elements of it by the group size (COMM_AVG).
struct mpi_pending {
    MPI_Request req;
    void *send, *recv;
    bool own_send, own_recv;
    void *dst;             // NULL: the result is already in place
    size_t dst_bytes;
    size_t avg;            // elements to average, 0 for none
    enum comm_dtype dt;
};

struct mpi_ctx {
    MPI_Comm comm;
    struct backend be;
    int rank, size;
    void *stage;        // host staging buffer (device backends only)
    size_t stage_bytes;
    float *wide;        // host fp32 copy of a bf16 buffer being reduced
    size_t wide_count;
    struct mpi_pending *pending; // (n_pending) started, not yet waited for, in start order
    int n_pending, cap_pending;
};

static MPI_Datatype mpi_type(enum comm_dtype dt) {
    switch (dt) {
    case COMM_F32: return MPI_FLOAT;
    case COMM_I32: return MPI_INT;
    case COMM_U8: return MPI_UNSIGNED_CHAR;
    case COMM_BF16: return MPI_UINT16_T; // moved as bits; all_reduce widens it to fp32 first
    case COMM_F64: return MPI_DOUBLE;
    case COMM_I64: return MPI_INT64_T;
    case COMM_U64: return MPI_UINT64_T;
    }
    tp_die(TP_EXIT_RUNTIME, "comm mpi: unknown comm_dtype %d (a caller passed a bad value)", (int)dt);
}

static MPI_Op mpi_op(enum comm_op op) {
    return op == COMM_MAX ? MPI_MAX : MPI_SUM; // AVG = SUM then a scale
}

static void mpi_check(int rc, const char *what) {
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    fprintf(stderr, "tptrain: MPI %s failed: %s\n", what, msg);
    MPI_Abort(MPI_COMM_WORLD, TP_EXIT_RUNTIME);
}

static void *stage_buffer(struct mpi_ctx *c, size_t bytes) {
    if (bytes > c->stage_bytes) {
        free(c->stage);
        c->stage = tp_malloc(bytes);
        c->stage_bytes = bytes;
    }
    return c->stage;
}

// Host view of a buffer: the buffer itself, or a staged copy of `bytes` of it.
static void *host_view(struct mpi_ctx *c, void *buf, size_t bytes, size_t cap, bool fill) {
    if (c->be.iface->host_accessible) return buf;
    void *h = stage_buffer(c, cap);
    if (fill) c->be.iface->copy_to_host(c->be.ctx, h, buf, bytes);
    return h;
}

static void host_done(struct mpi_ctx *c, void *dev, const void *host, size_t bytes) {
    if (!c->be.iface->host_accessible) c->be.iface->copy_to_device(c->be.ctx, dev, host, bytes);
}

// MPI counts are int: split very large collectives into chunks.
#define CHUNK ((size_t)1 << 30)

static void scale_avg(void *h, size_t count, enum comm_dtype dt, int size) {
    if (dt == COMM_F64) {
        double *d = h;
        for (size_t i = 0; i < count; i++) d[i] /= size;
        return;
    }
    if (dt != COMM_F32) tp_die(TP_EXIT_RUNTIME, "comm mpi: average is defined for f32 and f64 only");
    float *f = h;
    float inv = 1.0f / (float)size;
    for (size_t i = 0; i < count; i++) f[i] *= inv;
}

static void all_reduce_host(struct mpi_ctx *c, void *h, size_t count, enum comm_dtype dt, enum comm_op op) {
    size_t es = comm_dtype_size(dt);
    for (size_t off = 0; off < count; off += CHUNK) {
        size_t n = count - off < CHUNK ? count - off : CHUNK;
        mpi_check(MPI_Allreduce(MPI_IN_PLACE, (char *)h + off * es, (int)n, mpi_type(dt), mpi_op(op), c->comm),
                  "all_reduce");
    }
    if (op == COMM_AVG) scale_avg(h, count, dt, c->size);
}

// fp32 room for count widened bf16 values.
static float *wide_buffer(struct mpi_ctx *c, size_t count) {
    if (count > c->wide_count) {
        free(c->wide);
        c->wide = tp_malloc(count * sizeof(float));
        c->wide_count = count;
    }
    return c->wide;
}

// MPI has no bf16 arithmetic: widen to fp32, reduce, round back once (more accurate than bf16
// partial sums, and the same on every rank).
static void all_reduce_bf16_host(struct mpi_ctx *c, uint16_t *h, size_t count, enum comm_op op) {
    float *wide = wide_buffer(c, count);
    for (size_t i = 0; i < count; i++) wide[i] = tp_bf16_to_f32(h[i]);
    all_reduce_host(c, wide, count, COMM_F32, op);
    for (size_t i = 0; i < count; i++) h[i] = tp_bf16_from_f32(wide[i]);
}

static void mpi_all_reduce(void *ctx, void *buf, size_t count, enum comm_dtype dt, enum comm_op op) {
    struct mpi_ctx *c = ctx;
    size_t bytes = count * comm_dtype_size(dt);
    void *h = host_view(c, buf, bytes, bytes, true);
    if (dt == COMM_BF16) all_reduce_bf16_host(c, h, count, op);
    else all_reduce_host(c, h, count, dt, op);
    host_done(c, buf, h, bytes);
}

static void mpi_all_gather(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt) {
    struct mpi_ctx *c = ctx;
    size_t es = comm_dtype_size(dt), bytes = count * es;
    if (count > (size_t)INT_MAX) tp_die(TP_EXIT_RUNTIME, "comm mpi: all_gather of %zu elements is too large", count);
    char *h = host_view(c, out, bytes * (size_t)c->size, bytes * (size_t)c->size, false);
    // The rank's own block goes in place first, then MPI fills the others.
    if (c->be.iface->host_accessible) memmove(h + (size_t)c->rank * bytes, in, bytes);
    else c->be.iface->copy_to_host(c->be.ctx, h + (size_t)c->rank * bytes, in, bytes);
    mpi_check(MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, h, (int)count, mpi_type(dt), c->comm),
              "all_gather");
    host_done(c, out, h, bytes * (size_t)c->size);
}

static void mpi_reduce_scatter(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt,
                               enum comm_op op) {
    struct mpi_ctx *c = ctx;
    size_t es = comm_dtype_size(dt), bytes = count * es;
    if (count > (size_t)INT_MAX) tp_die(TP_EXIT_RUNTIME, "comm mpi: reduce_scatter of %zu elements is too large", count);
    // Stage the full input, reduce in place, keep this rank's block.
    char *h = stage_buffer(c, bytes * (size_t)c->size);
    if (c->be.iface->host_accessible) memcpy(h, in, bytes * (size_t)c->size);
    else c->be.iface->copy_to_host(c->be.ctx, h, in, bytes * (size_t)c->size);
    if (dt == COMM_BF16) { // summed in fp32 (as all_reduce does), this rank's block rounded once
        size_t total = count * (size_t)c->size;
        float *wide = wide_buffer(c, total);
        const uint16_t *hb = (const uint16_t *)h;
        for (size_t i = 0; i < total; i++) wide[i] = tp_bf16_to_f32(hb[i]);
        mpi_check(MPI_Reduce_scatter_block(MPI_IN_PLACE, wide, (int)count, MPI_FLOAT, mpi_op(op), c->comm),
                  "reduce_scatter");
        if (op == COMM_AVG) scale_avg(wide, count, COMM_F32, c->size);
        for (size_t i = 0; i < count; i++) ((uint16_t *)h)[i] = tp_bf16_from_f32(wide[i]);
    } else {
        mpi_check(MPI_Reduce_scatter_block(MPI_IN_PLACE, h, (int)count, mpi_type(dt), mpi_op(op), c->comm),
                  "reduce_scatter");
        if (op == COMM_AVG) scale_avg(h, count, dt, c->size);
    }
    if (c->be.iface->host_accessible) memcpy(out, h, bytes);
    else c->be.iface->copy_to_device(c->be.ctx, out, h, bytes);
}

static void mpi_broadcast(void *ctx, void *buf, size_t count, enum comm_dtype dt, int root) {
    struct mpi_ctx *c = ctx;
    size_t es = comm_dtype_size(dt), bytes = count * es;
    char *h = host_view(c, buf, bytes, bytes, c->rank == root);
    for (size_t off = 0; off < count; off += CHUNK) {
        size_t n = count - off < CHUNK ? count - off : CHUNK;
        mpi_check(MPI_Bcast(h + off * es, (int)n, mpi_type(dt), root, c->comm), "broadcast");
    }
    host_done(c, buf, h, bytes);
}

// ---- nonblocking collectives
//
// MPI's nonblocking collectives on host buffers. Device buffers are copied down at the start
// (which waits for the backend's queue) and up again at completion; in-place forms and AVG get
// a separate host buffer, since MPI forbids overlapping send and receive buffers. bf16 sums and
// counts beyond an int run blocking.

static struct mpi_pending *pending_push(struct mpi_ctx *c) {
    if (c->n_pending == c->cap_pending) {
        int cap = c->cap_pending ? 2 * c->cap_pending : 16;
        struct mpi_pending *grown = tp_malloc((size_t)cap * sizeof *grown);
        if (c->n_pending) memcpy(grown, c->pending, (size_t)c->n_pending * sizeof *grown);
        free(c->pending);
        c->pending = grown;
        c->cap_pending = cap;
    }
    struct mpi_pending *p = &c->pending[c->n_pending++];
    memset(p, 0, sizeof *p);
    p->req = MPI_REQUEST_NULL;
    return p;
}

// A host copy of `bytes` of buffer src (host or device memory), owned by the caller.
static void *host_copy(struct mpi_ctx *c, const void *src, size_t bytes) {
    void *h = tp_malloc(bytes ? bytes : 1);
    if (c->be.iface->host_accessible) memcpy(h, src, bytes);
    else c->be.iface->copy_to_host(c->be.ctx, h, src, bytes);
    return h;
}

static void mpi_all_reduce_start(void *ctx, void *buf, size_t count, enum comm_dtype dt, enum comm_op op) {
    struct mpi_ctx *c = ctx;
    if (dt == COMM_BF16 || count > (size_t)INT_MAX) {
        mpi_all_reduce(ctx, buf, count, dt, op);
        return;
    }
    size_t bytes = count * comm_dtype_size(dt);
    struct mpi_pending *p = pending_push(c);
    p->dt = dt;
    p->avg = op == COMM_AVG ? count : 0;
    if (c->be.iface->host_accessible) {
        p->recv = buf; // reduced in place, averaged in place
    } else {
        p->recv = host_copy(c, buf, bytes);
        p->own_recv = true;
        p->dst = buf;
        p->dst_bytes = bytes;
    }
    mpi_check(MPI_Iallreduce(MPI_IN_PLACE, p->recv, (int)count, mpi_type(dt), mpi_op(op), c->comm, &p->req),
              "all_reduce (nonblocking)");
}

static void mpi_reduce_scatter_start(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt,
                                     enum comm_op op) {
    struct mpi_ctx *c = ctx;
    if (dt == COMM_BF16 || count > (size_t)INT_MAX / (size_t)c->size) {
        mpi_reduce_scatter(ctx, out, in, count, dt, op);
        return;
    }
    size_t bytes = count * comm_dtype_size(dt);
    struct mpi_pending *p = pending_push(c);
    p->dt = dt;
    p->avg = op == COMM_AVG ? count : 0;
    // out usually lies inside in (Megatron's in-place form): MPI reads a host copy when the
    // buffers are device memory, and in itself otherwise, never written before completion.
    if (c->be.iface->host_accessible) {
        p->send = (void *)in;
    } else {
        p->send = host_copy(c, in, bytes * (size_t)c->size);
        p->own_send = true;
    }
    p->recv = tp_malloc(bytes ? bytes : 1);
    p->own_recv = true;
    p->dst = out;
    p->dst_bytes = bytes;
    mpi_check(MPI_Ireduce_scatter_block(p->send, p->recv, (int)count, mpi_type(dt), mpi_op(op), c->comm, &p->req),
              "reduce_scatter (nonblocking)");
}

static void mpi_all_gather_start(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt) {
    struct mpi_ctx *c = ctx;
    if (count > (size_t)INT_MAX) {
        mpi_all_gather(ctx, out, in, count, dt);
        return;
    }
    size_t bytes = count * comm_dtype_size(dt);
    struct mpi_pending *p = pending_push(c);
    p->dt = dt;
    char *h;
    if (c->be.iface->host_accessible) {
        h = out;
        memmove(h + (size_t)c->rank * bytes, in, bytes);
    } else {
        h = tp_malloc(bytes * (size_t)c->size);
        c->be.iface->copy_to_host(c->be.ctx, h + (size_t)c->rank * bytes, in, bytes);
        p->own_recv = true;
        p->dst = out;
        p->dst_bytes = bytes * (size_t)c->size;
    }
    p->recv = h;
    mpi_check(MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, h, (int)count, mpi_type(dt), c->comm, &p->req),
              "all_gather (nonblocking)");
}

// Completes every started collective, in start order.
static void mpi_wait(void *ctx) {
    struct mpi_ctx *c = ctx;
    for (int i = 0; i < c->n_pending; i++) {
        struct mpi_pending *p = &c->pending[i];
        mpi_check(MPI_Wait(&p->req, MPI_STATUS_IGNORE), "wait");
        if (p->avg) scale_avg(p->recv, p->avg, p->dt, c->size);
        if (p->dst && c->be.iface->host_accessible) memcpy(p->dst, p->recv, p->dst_bytes);
        else if (p->dst) c->be.iface->copy_to_device(c->be.ctx, p->dst, p->recv, p->dst_bytes);
        if (p->own_send) free(p->send);
        if (p->own_recv) free(p->recv);
    }
    c->n_pending = 0;
}

static void mpi_synchronize(void *ctx) {
    struct mpi_ctx *c = ctx;
    mpi_wait(c);
    c->be.iface->synchronize(c->be.ctx); // MPI calls are blocking: only the backend's queue remains
}

// ---- host collectives

static void mpi_host_all_reduce(void *ctx, void *buf, size_t count, enum comm_dtype dt, enum comm_op op) {
    struct mpi_ctx *c = ctx;
    if (dt == COMM_BF16) all_reduce_bf16_host(c, buf, count, op);
    else all_reduce_host(c, buf, count, dt, op);
}

static int int_count(size_t count, const char *what) {
    if (count > (size_t)INT_MAX) tp_die(TP_EXIT_RUNTIME, "comm mpi: %s of %zu elements is too large", what, count);
    return (int)count;
}

static void mpi_host_all_gather(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt) {
    struct mpi_ctx *c = ctx;
    int n = int_count(count, "all_gather");
    mpi_check(MPI_Allgather(in, n, mpi_type(dt), out, n, mpi_type(dt), c->comm), "all_gather");
}

static void mpi_host_gather(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt, int root) {
    struct mpi_ctx *c = ctx;
    int n = int_count(count, "gather");
    mpi_check(MPI_Gather(in, n, mpi_type(dt), out, n, mpi_type(dt), root, c->comm), "gather");
}

static void mpi_host_broadcast(void *ctx, void *buf, size_t count, enum comm_dtype dt, int root) {
    struct mpi_ctx *c = ctx;
    size_t es = comm_dtype_size(dt);
    for (size_t off = 0; off < count; off += CHUNK) {
        size_t n = count - off < CHUNK ? count - off : CHUNK;
        mpi_check(MPI_Bcast((char *)buf + off * es, (int)n, mpi_type(dt), root, c->comm), "broadcast");
    }
}

static void mpi_barrier(void *ctx) {
    struct mpi_ctx *c = ctx;
    mpi_check(MPI_Barrier(c->comm), "barrier");
}

static const char *mpi_name(void *ctx) {
    const struct mpi_ctx *c = ctx;
    return c->size == 1 ? "self" : "mpi"; // a group of one never communicates
}

static void mpi_destroy(void *ctx) {
    struct mpi_ctx *c = ctx;
    mpi_wait(c);
    free(c->pending);
    free(c->stage);
    free(c->wide);
    free(c);
}

static const struct comm_i mpi_iface = {
    .name = mpi_name,
    .all_reduce = mpi_all_reduce,
    .all_gather = mpi_all_gather,
    .reduce_scatter = mpi_reduce_scatter,
    .broadcast = mpi_broadcast,
    .synchronize = mpi_synchronize,
    .all_reduce_start = mpi_all_reduce_start,
    .reduce_scatter_start = mpi_reduce_scatter_start,
    .all_gather_start = mpi_all_gather_start,
    .wait = mpi_wait,
    .host_all_reduce = mpi_host_all_reduce,
    .host_all_gather = mpi_host_all_gather,
    .host_gather = mpi_host_gather,
    .host_broadcast = mpi_host_broadcast,
    .barrier = mpi_barrier,
    .destroy = mpi_destroy,
};

struct comm comm_mpi_create(const void *mpi_comm, struct backend be) {
    struct mpi_ctx *c = tp_calloc(1, sizeof *c);
    c->comm = *(const MPI_Comm *)mpi_comm; // the handle is copied: callers may pass a temporary
    c->be = be;
    MPI_Comm_rank(c->comm, &c->rank);
    MPI_Comm_size(c->comm, &c->size);
    return (struct comm){.iface = &mpi_iface, .ctx = c, .rank = c->rank, .size = c->size};
}
