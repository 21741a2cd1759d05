// mesh.c: MPI bootstrap of the (dp, tp) mesh, GPU choice and per-dimension comms.
#include "mesh.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

void mesh_init(struct mesh *m, const struct tp_config *cfg) {
    memset(m, 0, sizeof *m);
    m->world = MPI_COMM_WORLD;
    MPI_Comm_rank(m->world, &m->world_rank);
    MPI_Comm_size(m->world, &m->world_size);
    int tp_size = cfg->parallel.tp, tp_rank = m->world_rank % tp_size;
    m->dp_size = m->world_size / tp_size;
    m->dp_rank = m->world_rank / tp_size;
    // One sub-communicator per mesh dimension: same dp coordinate -> one TP group, and vice versa.
    // The TP comm built on tp_comm (mesh_create_comms) then holds the TP size and rank.
    MPI_Comm_split(m->world, m->dp_rank, tp_rank, &m->tp_comm);
    MPI_Comm_split(m->world, tp_rank, m->dp_rank, &m->dp_comm);
    MPI_Comm node;
    MPI_Comm_split_type(m->world, MPI_COMM_TYPE_SHARED, m->world_rank, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &m->local_rank);
    MPI_Comm_size(node, &m->local_size);
    MPI_Comm_free(&node);
    m->device = -1;
}

int mesh_agree(const struct mesh *m, int status) {
    int worst = status;
    MPI_Allreduce(&status, &worst, 1, MPI_INT, MPI_MAX, m->world);
    return worst;
}

int mesh_agree_first(const struct mesh *m, int status, int *first) {
    int worst = mesh_agree(m, status);
    int me = status ? m->world_rank : m->world_size;
    *first = me;
    if (worst) MPI_Allreduce(&me, first, 1, MPI_INT, MPI_MIN, m->world);
    return worst;
}

void mesh_world(int *rank, int *size) {
    if (rank) MPI_Comm_rank(MPI_COMM_WORLD, rank);
    if (size) MPI_Comm_size(MPI_COMM_WORLD, size);
}

int mesh_any_bits(const struct mesh *m, int bits) {
    int all = bits;
    MPI_Allreduce(&bits, &all, 1, MPI_INT, MPI_BOR, m->world);
    return all;
}

void mesh_abort(const struct mesh *m, int code, const char *msg) {
    if (msg) {
        fprintf(stderr, "tptrain: rank %d: %s\n", m->world_rank, msg);
        fflush(stderr);
    }
    MPI_Abort(m->world, code);
    exit(code); // not reached
}

// TPTRAIN_OVERLAP_SMS (backend_cuda's): unset, empty or a whole number; the CUDA backend checks it
// against the device's multiprocessors.
static bool overlap_sms_well_formed(char *err, size_t errlen) {
    const char *v = getenv("TPTRAIN_OVERLAP_SMS");
    if (!v || !*v) return true;
    const char *p = v;
    while (*p >= '0' && *p <= '9') p++;
    if (!*p && p - v <= 9) return true;
    snprintf(err, errlen, "TPTRAIN_OVERLAP_SMS=%s: expected a whole number of multiprocessors (0 to the "
             "device's count less one) for the products to leave to collectives; unset it for none", v);
    return false;
}

// The CUDA backend's switches that take one of a few words (read where they act: gemm.cu,
// flash_attention.cu; docs/usage.md lists them): unset or empty for the default, else one of
// `values`, checked here so that a misspelt one stops the run instead of being taken as the default.
static const struct {
    const char *name, *values[3], *what;
} choice_variables[] = {
    {"TPTRAIN_GEMM_TUNE", {"0", "1"}, "whether the products' algorithms are chosen by timing (1) or are "
                                      "cuBLASLt's first heuristic answer, the same in every process (0)"},
    {"TPTRAIN_GEMM_SM90", {"0", "1", "auto"}, "whether the products with a GELU epilogue run tptrain's Hopper "
                                               "kernels: never, always, or where timed faster"},
    {"TPTRAIN_GEMM_SM90_EPILOGUE", {"registers", "tma"}, "how tptrain's Hopper GELU products write their tiles"},
    {"TPTRAIN_GEMM_SM90_TILE", {"128", "256"}, "the columns of tptrain's Hopper GELU products' output tiles"},
    {"TPTRAIN_GEMM_SM90_CLUSTER", {"0", "1"}, "whether tptrain's Hopper GELU products run in clusters of two"},
    {"TPTRAIN_GEMM_SM90_WIDE_STAGES", {"3", "4"}, "the stages of tptrain's Hopper GELU products' 128 x 256 tiles"},
    {"TPTRAIN_GEMM_SM90_PLAIN", {"0", "1"}, "whether tptrain's Hopper products also take the forwards with no GELU"},
    {"TPTRAIN_GEMM_SM90_TURN", {"done", "issued"}, "when a consumer of tptrain's Hopper GELU products hands over "
                                                  "the tensor cores"},
    {"TPTRAIN_ATTN_WS", {"0", "1"}, "whether the Hopper attention kernels use warp specialisation"},
    {"TPTRAIN_ATTN_PINGPONG", {"0", "1"}, "whether the Hopper attention forward's consumers ping-pong"},
    {"TPTRAIN_ATTN_BWD", {"fused", "split", "unordered"}, "the Hopper attention backward's kernels"},
    {"TPTRAIN_ATTN_BWD_PERSIST", {"0", "1"}, "whether the Hopper attention backward's blocks persist"},
    {"TPTRAIN_ATTN_ORDER", {"pairs", "longest"}, "the Hopper attention forward's walk over the work"},
    {"TPTRAIN_ATTN_Q_STAGES", {"1", "2"}, "the Hopper attention forward's stages of query tiles"},
    {"TPTRAIN_ATTN_KV_STAGES", {"1", "2"}, "the Hopper attention backward's stages of key and value tiles"},
    {"TPTRAIN_ATTN_BWD_ORDER", {"heads", "longest"}, "the Hopper attention backward's walk over the work"},
    {"TPTRAIN_ATTN_EXP2", {"mufu", "mixed"}, "how the Hopper attention forward computes its exponentials"},
    {"TPTRAIN_LN_BWD", {"pipelined", "rows"}, "the bf16 layernorm backward's kernel"},
    {"TPTRAIN_EMB_BWD", {"tiles", "sorted"}, "the token embedding backward's kernel"},
    {"TPTRAIN_STEP_GRAPH", {"0", "1"}, "whether a step's forward and backward run as one CUDA graph"},
    {"TPTRAIN_ATTN_BWD_SUMS", {"after", "fused"}, "where qkv's bias gradient is summed on the GPU"},
};

static bool choice_variables_well_formed(char *err, size_t errlen) {
    for (size_t i = 0; i < sizeof choice_variables / sizeof choice_variables[0]; i++) {
        const char *v = getenv(choice_variables[i].name);
        if (!v || !*v) continue;
        const char *const *ok = choice_variables[i].values;
        bool known = false;
        for (int j = 0; j < 3 && ok[j]; j++) known = known || strcmp(v, ok[j]) == 0;
        if (known) continue;
        snprintf(err, errlen, "%s=%s: expected %s%s%s%s%s (%s); unset it for the default", choice_variables[i].name, v,
                 ok[0], ok[2] ? ", " : " or ", ok[1], ok[2] ? " or " : "", ok[2] ? ok[2] : "", choice_variables[i].what);
        return false;
    }
    return true;
}

int mesh_create_backend(struct mesh *m, const struct tp_config *cfg, struct backend *be, char *err,
                        size_t errlen) {
    enum tp_device_kind want = cfg->parallel.device;
    int ndev = backend_cuda_available() ? backend_cuda_device_count() : 0;
    int status = 0;
    if (!overlap_sms_well_formed(err, errlen) || !choice_variables_well_formed(err, errlen)) status = TP_EXIT_USAGE;
    else if (want == TP_DEVICE_CUDA && ndev == 0) {
        snprintf(err, errlen, "parallel.device: cuda requested but %s; use device: cpu or auto",
                 backend_cuda_available() ? "no CUDA device is visible" : "this build has no CUDA backend");
        status = TP_EXIT_USAGE;
    }
    // Every rank must pick the same kind of backend, so agree on whether all ranks see a GPU.
    int has_gpu = ndev > 0, all_gpu = 0;
    MPI_Allreduce(&has_gpu, &all_gpu, 1, MPI_INT, MPI_MIN, m->world);
    status = mesh_agree(m, status);
    if (status) {
        if (!err[0]) snprintf(err, errlen, "parallel.device: another rank could not use its device");
        return status;
    }
    bool use_cuda = want == TP_DEVICE_CUDA || (want == TP_DEVICE_AUTO && all_gpu);
    enum tp_dtype dtype = mesh_compute_dtype(cfg);
    if (use_cuda) {
        m->device = m->local_rank % ndev;
        int shared = m->local_size > ndev, any_shared = 0;
        MPI_Allreduce(&shared, &any_shared, 1, MPI_INT, MPI_MAX, m->world);
        m->gpu_shared = any_shared;
        status = backend_cuda_create(be, m->device, dtype, err, errlen) ? 0 : TP_EXIT_RUNTIME;
    } else {
        *be = backend_cpu_create(dtype);
    }
    status = mesh_agree(m, status);
    if (status && !err[0]) snprintf(err, errlen, "another rank failed to create its backend");
    return status;
}

static int make_comm(struct comm *out, MPI_Comm c, bool nccl, struct backend be, char *err, size_t errlen) {
    if (nccl) return comm_nccl_create(out, &c, be, err, errlen) ? 0 : TP_EXIT_RUNTIME;
    *out = comm_mpi_create(&c, be);
    return 0;
}

int mesh_create_comms(struct mesh *m, const struct tp_config *cfg, struct backend be, char *err,
                      size_t errlen) {
    bool on_gpu = m->device >= 0;
    bool nccl = false;
    switch (cfg->parallel.comm) {
    case TP_COMM_MPI: nccl = false; break;
    case TP_COMM_NCCL:
        if (!on_gpu || m->gpu_shared) {
            snprintf(err, errlen,
                     "parallel.comm: nccl needs one GPU per rank, but %s; use comm: mpi or auto",
                     on_gpu ? "ranks share a GPU on this node" : "the run is on the CPU backend");
            return TP_EXIT_USAGE;
        }
        nccl = true;
        break;
    case TP_COMM_AUTO:
        nccl = on_gpu && !m->gpu_shared && comm_nccl_available();
        if (on_gpu && m->gpu_shared && m->world_rank == 0)
            fprintf(stderr, "tptrain: notice: %d ranks share the GPUs of a node; collectives use MPI "
                            "staged through host memory (NCCL needs one GPU per rank)\n", m->local_size);
        break;
    }
    // A group of one never communicates. Under auto it gets the MPI comm, which holds no GPU
    // memory: an NCCL communicator reserves device buffers even for a single rank.
    bool forced = cfg->parallel.comm == TP_COMM_NCCL;
    int status = make_comm(&m->tp, m->tp_comm, nccl && (forced || cfg->parallel.tp > 1), be, err, errlen);
    if (!status) status = make_comm(&m->dp, m->dp_comm, nccl && (forced || m->dp_size > 1), be, err, errlen);
    status = mesh_agree(m, status);
    if (status && !err[0]) snprintf(err, errlen, "another rank failed to create its communicators");
    return status;
}

void mesh_destroy(struct mesh *m) {
    comm_destroy(&m->tp);
    comm_destroy(&m->dp);
    if (m->tp_comm != MPI_COMM_NULL) MPI_Comm_free(&m->tp_comm);
    if (m->dp_comm != MPI_COMM_NULL) MPI_Comm_free(&m->dp_comm);
}
