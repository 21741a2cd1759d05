// backend_cuda.cu: the CUDA backend behind struct backend_i (src/backend.h), fp32 and bf16.
//
// One context per backend: a device, a compute dtype, a non-blocking stream, a cuBLAS handle bound
// to that stream (pedantic math: TF32 and emulation off) with its own workspace, a scratch buffer
// for reduction partials, and on the bf16 path a cuBLASLt product context (gemm.h). Every op is
// enqueued on the stream; only copy_to_host and synchronize wait.
//
// Two paths. TP_DTYPE_F32 is the reference: cuBLAS SGEMM, the naive attention through (T, T)
// score matrices, statistics in double; its numerics are fixed (tests compare it to the CPU at
// 1e-5). TP_DTYPE_BF16 is the fast path: compute tensors (activations, their gradients, the
// compute copy of the weights) are bf16, every op computes in fp32 and rounds on store; products
// run through gemm.h (bf16 tensor cores, fused bias / GELU / DGELU epilogues) and attention through
// flash_attention.h. Elementwise and normalisation kernels are templated on the storage type E
// (float or bf16) and move 16 bytes per access where the shape and alignment allow, with an
// element-wise fallback otherwise; for fp32 the vector forms do the same arithmetic per element
// as the scalar ones, so vectorising changed no fp32 bit.
//
// Determinism: no float atomics anywhere. Every reduction is split into per-block partials with a
// grid that depends only on the problem size, then summed in a fixed order, so identical inputs
// give bitwise identical outputs on every call (cuBLAS and the cached cuBLASLt algorithms are
// deterministic for a fixed handle, workspace and stream).
//
// Files: cuda_internal.cuh (context, checks, storage types, device helpers, the op declarations);
// one file per op family with its kernels and launchers (embedding.cu, layernorm.cu, matmul.cu,
// residual_gelu.cu, attention.cu, cross_entropy.cu, optim.cu, casts.cu; colsum.cuh,
// colsum_finish.cuh and gelu.cuh hold the kernels two families launch); this file: memory ops, timing events, the backend table
// and context creation. Adding an op: its launcher in its family file, its declaration in
// cuda_internal.cuh, its line in the table below.

#include <cuda_profiler_api.h>

#include "cuda_internal.cuh"

static const char *cuda_name(void *ctx) {
    (void)ctx;
    return "cuda";
}

static enum tp_dtype cuda_dtype(void *ctx) { return ((struct cuda_ctx *)ctx)->dtype; }

static void *cuda_alloc(void *ctx, size_t bytes) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (bytes == 0) bytes = 1; // a valid, distinct pointer, as calloc(0) may give
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) die_out_of_memory(c, bytes, e, "a backend buffer");
    CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, c->stream));
    if (c->n_allocs == c->cap_allocs) {
        c->cap_allocs = c->cap_allocs ? 2 * c->cap_allocs : 64;
        c->allocs = (struct cuda_alloc_rec *)realloc(c->allocs, (size_t)c->cap_allocs * sizeof *c->allocs);
        if (!c->allocs) tp_die(TP_EXIT_RUNTIME, "cuda backend: out of host memory for the allocation table");
    }
    c->allocs[c->n_allocs++] = (struct cuda_alloc_rec){p, bytes};
    ctx_mem_add(c, bytes);
    return p;
}

static void cuda_free(void *ctx, void *ptr) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (!ptr) return;
    // queued work may still use ptr; cudaFree alone does not order against a non-blocking stream
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    CUDA_CHECK(cudaFree(ptr));
    for (int i = c->n_allocs - 1; i >= 0; i--) // a few dozen live buffers: a scan is enough
        if (c->allocs[i].ptr == ptr) {
            c->mem_now -= c->allocs[i].bytes;
            c->allocs[i] = c->allocs[--c->n_allocs];
            break;
        }
}

// The backend's own cudaMalloc'd bytes (buffers, reduction scratch, the cuBLAS and cuBLASLt
// workspaces; cuBLASLt's internal scratch is not seen), and the whole device's use.
static void cuda_memory_stats(void *ctx, struct backend_memory *out) {
    struct cuda_ctx *c = ctx_of(ctx);
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
        (void)cudaGetLastError();
        free_b = total_b = 0;
    }
    *out = (struct backend_memory){.now = c->mem_now, .peak = c->mem_peak, .device_used = total_b - free_b,
                                   .device_total = total_b};
}

static void cuda_zero(void *ctx, void *ptr, size_t bytes) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (bytes == 0) return;
    CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, c->stream));
}

static void cuda_copy_to_device(void *ctx, void *dst, const void *host_src, size_t bytes) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (bytes == 0) return;
    CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, c->stream));
    // From pageable memory the call returns once the source is staged, so the caller may reuse
    // it. From pinned memory the copy is truly asynchronous: wait, so callers never need to know.
    cudaPointerAttributes attr;
    if (cudaPointerGetAttributes(&attr, host_src) != cudaSuccess) {
        (void)cudaGetLastError();
        CUDA_CHECK(cudaStreamSynchronize(c->stream));
    } else if (attr.type == cudaMemoryTypeHost) {
        CUDA_CHECK(cudaStreamSynchronize(c->stream));
    }
}

static void cuda_copy_to_host(void *ctx, void *host_dst, const void *src, size_t bytes) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (bytes == 0) return;
    CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, c->stream));
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
}

static void cuda_copy(void *ctx, void *dst, const void *src, size_t bytes) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (bytes == 0 || dst == src) return;
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream));
}
static void cuda_synchronize(void *ctx) {
    struct cuda_ctx *c = ctx_of(ctx);
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
}

static void *cuda_native_stream(void *ctx) {
    return (void *)((struct cuda_ctx *)ctx)->stream;
}

// Collectives on a side stream need multiprocessors of their own: a product that fills every
// multiprocessor (cuBLASLt's persistent kernels do) leaves them none until it ends, so the two run
// one after the other. While any collective runs, products are tuned and run for the
// multiprocessors left over.
static void cuda_overlap(void *ctx, int delta) {
    struct cuda_ctx *c = ctx_of(ctx);
    c->overlap += delta;
    if (c->gemm && c->overlap_sms > 0) gemm_set_sm_target(c->gemm, c->overlap > 0 ? c->sm_count - c->overlap_sms : 0);
}

// debug.profile_step: the capture range of a profiler started with it off (ncu --profile-from-start
// off). The range closes after the queued work has run, so that it holds exactly the step's kernels.
static void cuda_profile(void *ctx, bool on) {
    struct cuda_ctx *c = ctx_of(ctx);
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    CUDA_CHECK(on ? cudaProfilerStart() : cudaProfilerStop());
}

// A training step's forward and backward as one CUDA graph (TPTRAIN_STEP_GRAPH=1; model.c decides
// when). Relaxed capture: the host calls the ops make (tensor maps, function attributes) stay
// allowed; what the stream itself must not do while capturing (a synchronisation) would end the
// capture with an error, which graph_end reports as NULL.
static bool cuda_graphs(void *ctx) { return ctx_of(ctx)->step_graphs; }

static bool cuda_graph_begin(void *ctx) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    c->capturing = true;
    return true;
}

static void *cuda_graph_end(void *ctx) {
    struct cuda_ctx *c = ctx_of(ctx);
    cudaGraph_t g = NULL;
    cudaError_t e = cudaStreamEndCapture(c->stream, &g);
    c->capturing = false;
    cudaGraphExec_t x = NULL;
    if (e == cudaSuccess && g) e = cudaGraphInstantiate(&x, g, 0);
    if (g) cudaGraphDestroy(g);
    if (e != cudaSuccess || !x) {
        (void)cudaGetLastError();
        return NULL;
    }
    return (void *)x;
}

static void cuda_graph_launch(void *ctx, void *graph) {
    CUDA_CHECK(cudaGraphLaunch((cudaGraphExec_t)graph, ctx_of(ctx)->stream));
}

static void cuda_graph_free(void *ctx, void *graph) {
    (void)ctx;
    if (graph) CUDA_CHECK(cudaGraphExecDestroy((cudaGraphExec_t)graph));
}

static void cuda_destroy(void *ctx) {
    struct cuda_ctx *c = ctx_of(ctx);
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    if (c->gemm) gemm_destroy(c->gemm);
    CUBLAS_CHECK(cublasDestroy(c->blas));
    if (c->blas_ws) CUDA_CHECK(cudaFree(c->blas_ws));
    if (c->scratch) CUDA_CHECK(cudaFree(c->scratch));
    CUDA_CHECK(cudaStreamDestroy(c->stream));
    free(c->allocs);
    free(c);
}


// ---- timing events

// Events time the stream, not the host: what lies between two records is the GPU work queued
// between them, including any idle gap while the host waits (e.g. an MPI collective staged
// through host memory). Created with timing on; reused across records.
static void *cuda_event_create(void *ctx) {
    (void)ctx_of(ctx);
    cudaEvent_t ev;
    CUDA_CHECK(cudaEventCreate(&ev));
    return (void *)ev;
}

static void cuda_event_record(void *ctx, void *ev) {
    struct cuda_ctx *c = ctx_of(ctx);
    CUDA_CHECK(cudaEventRecord((cudaEvent_t)ev, c->stream));
}

static float cuda_event_elapsed_ms(void *ctx, void *start, void *end) {
    (void)ctx_of(ctx);
    CUDA_CHECK(cudaEventSynchronize((cudaEvent_t)end));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, (cudaEvent_t)start, (cudaEvent_t)end));
    return ms;
}

static void cuda_event_destroy(void *ctx, void *ev) {
    (void)ctx_of(ctx);
    CUDA_CHECK(cudaEventDestroy((cudaEvent_t)ev));
}

// ---- backend table

static const struct backend_i cuda_iface = {
    .name = cuda_name,
    .dtype = cuda_dtype,
    .host_accessible = false,
    .alloc = cuda_alloc,
    .free = cuda_free,
    .zero = cuda_zero,
    .copy_to_device = cuda_copy_to_device,
    .copy_to_host = cuda_copy_to_host,
    .copy = cuda_copy,
    .to_compute = cuda_to_compute,
    .from_compute = cuda_from_compute,
    .synchronize = cuda_synchronize,
    .native_stream = cuda_native_stream,
    .memory_stats = cuda_memory_stats,
    .overlap = cuda_overlap,
    .profile = cuda_profile,
    .graphs = cuda_graphs,
    .graph_begin = cuda_graph_begin,
    .graph_end = cuda_graph_end,
    .graph_launch = cuda_graph_launch,
    .graph_free = cuda_graph_free,
    .destroy = cuda_destroy,
    .vocab_embedding_fwd = cuda_vocab_embedding_fwd,
    .vocab_embedding_bwd = cuda_vocab_embedding_bwd,
    .position_embedding_fwd = cuda_position_embedding_fwd,
    .position_embedding_bwd = cuda_position_embedding_bwd,
    .layernorm_fwd = cuda_layernorm_fwd,
    .layernorm_bwd = cuda_layernorm_bwd,
    .matmul_fwd = cuda_matmul_fwd,
    .matmul_bwd = cuda_matmul_bwd,
    .residual_fwd = cuda_residual_fwd,
    .residual_layernorm_fwd = cuda_residual_layernorm_fwd,
    .gelu_fwd = cuda_gelu_fwd,
    .gelu_bwd = cuda_gelu_bwd,
    .attention_saved_floats = cuda_attention_saved_floats,
    .attention_scratch_floats = cuda_attention_scratch_floats,
    .attention_fwd = cuda_attention_fwd,
    .attention_bwd = cuda_attention_bwd,
    .attention_decode = cuda_attention_decode,
    .attention_path = cuda_attention_path,
    .xent_stats = cuda_xent_stats,
    .xent_rescale = cuda_xent_rescale,
    .xent_loss = cuda_xent_loss,
    .xent_bwd = cuda_xent_bwd,
    .xent_fused = cuda_xent_fused,
    .sum = cuda_sum,
    .sumsq_acc = cuda_sumsq_acc,
    .segments_sumsq = cuda_segments_sumsq,
    .scale = cuda_scale,
    .adamw = cuda_adamw,
    .event_create = cuda_event_create,
    .event_record = cuda_event_record,
    .event_elapsed_ms = cuda_event_elapsed_ms,
    .event_destroy = cuda_event_destroy,
};

// ---- public entry points

// TPTRAIN_OVERLAP_SMS: multiprocessors the products leave to collectives running beside them
// (0, the default: none).
static bool overlap_sms_from_env(int sm_count, int *out, char *err, size_t errlen) {
    const char *v = getenv("TPTRAIN_OVERLAP_SMS");
    *out = 0;
    if (!v || !*v) return true;
    char *end = NULL;
    long n = strtol(v, &end, 10);
    if (*end || n < 0 || n >= sm_count) {
        snprintf(err, errlen, "TPTRAIN_OVERLAP_SMS=%s: must be an integer from 0 to %d (this device's "
                 "multiprocessors less one); unset it to give the products every multiprocessor", v, sm_count - 1);
        return false;
    }
    *out = (int)n;
    return true;
}

// Whether the environment sets name to value.
static bool env_is(const char *name, const char *value) {
    const char *v = getenv(name);
    return v && strcmp(v, value) == 0;
}

extern "C" int backend_cuda_device_count(void) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); // no driver or no device: not an error for the caller
        return 0;
    }
    return n;
}

extern "C" bool backend_cuda_available(void) { return backend_cuda_device_count() > 0; }

extern "C" bool backend_cuda_create(struct backend *out, int device, enum tp_dtype dtype,
                                    char *err, size_t errlen) {
    out->iface = NULL;
    out->ctx = NULL;
    if (dtype != TP_DTYPE_F32 && dtype != TP_DTYPE_BF16) {
        snprintf(err, errlen, "cuda backend: unknown compute dtype %d", (int)dtype);
        return false;
    }
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count <= 0) {
        (void)cudaGetLastError();
        snprintf(err, errlen, "no usable CUDA device (%s); check the driver with nvidia-smi and "
                 "CUDA_VISIBLE_DEVICES", e != cudaSuccess ? cudaGetErrorString(e) : "none visible");
        return false;
    }
    if (device < 0 || device >= count) {
        snprintf(err, errlen, "CUDA device %d does not exist (%d visible)", device, count);
        return false;
    }
    struct cuda_ctx *c = (struct cuda_ctx *)tp_calloc(1, sizeof *c);
    c->device = device;
    c->dtype = dtype;
    const char *step = "cudaSetDevice";
    cublasStatus_t bs = CUBLAS_STATUS_SUCCESS;
    bool have_stream = false, have_blas = false;
    if ((e = cudaSetDevice(device)) != cudaSuccess) goto cuda_fail;
    {
        // A kernel image for this device must exist; catch an arch mismatch here, not mid-run.
        struct cudaFuncAttributes fa;
        step = "kernel image lookup";
        if ((e = cudaFuncGetAttributes(&fa, cuda_probe_kernel())) != cudaSuccess) {
            struct cudaDeviceProp prop;
            int major = 0, minor = 0;
            if (cudaGetDeviceProperties(&prop, device) == cudaSuccess) {
                major = prop.major;
                minor = prop.minor;
            }
            (void)cudaGetLastError();
            snprintf(err, errlen, "CUDA device %d (sm_%d%d) cannot run this build's kernels (%s); "
                     "reconfigure with -Dgpu_arch=%d%d", device, major, minor,
                     cudaGetErrorString(e), major, minor);
            free(c);
            return false;
        }
    }
    step = "cudaDeviceGetAttribute (multiprocessors)";
    if ((e = cudaDeviceGetAttribute(&c->sm_count, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess)
        goto cuda_fail;
    if (!overlap_sms_from_env(c->sm_count, &c->overlap_sms, err, errlen)) {
        free(c);
        return false;
    }
    // the kernel switches (mesh.c has checked their values; unset is the first of each)
    c->ln_bwd_pipelined = !env_is("TPTRAIN_LN_BWD", "rows");     // or pipelined (the default)
    c->emb_bwd_sorted = env_is("TPTRAIN_EMB_BWD", "sorted");      // or tiles
    c->step_graphs = env_is("TPTRAIN_STEP_GRAPH", "1");           // or 0
    c->attn_bwd_sums = env_is("TPTRAIN_ATTN_BWD_SUMS", "fused");  // or after
    step = "cudaStreamCreateWithFlags";
    if ((e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) != cudaSuccess)
        goto cuda_fail;
    have_stream = true;
    step = "cudaMalloc (cuBLAS workspace)";
    if ((e = cudaMalloc(&c->blas_ws, CUDA_BLAS_WORKSPACE_BYTES)) != cudaSuccess) goto cuda_fail;
    ctx_mem_add(c, CUDA_BLAS_WORKSPACE_BYTES);
    step = "cublasCreate";
    if ((bs = cublasCreate(&c->blas)) != CUBLAS_STATUS_SUCCESS) goto blas_fail;
    have_blas = true;
    step = "cublasSetStream";
    if ((bs = cublasSetStream(c->blas, c->stream)) != CUBLAS_STATUS_SUCCESS) goto blas_fail;
    step = "cublasSetWorkspace";
    if ((bs = cublasSetWorkspace(c->blas, c->blas_ws, CUDA_BLAS_WORKSPACE_BYTES)) !=
        CUBLAS_STATUS_SUCCESS)
        goto blas_fail;
    // fp32 reference arithmetic: pedantic math keeps TF32 and BF16x9 emulation off even when
    // environment variables (NVIDIA_TF32_OVERRIDE, CUBLAS_EMULATE_SINGLE_PRECISION) ask for them.
    step = "cublasSetMathMode";
    if ((bs = cublasSetMathMode(c->blas, CUBLAS_PEDANTIC_MATH)) != CUBLAS_STATUS_SUCCESS)
        goto blas_fail;
    if (dtype == TP_DTYPE_BF16) {
        char gerr[256] = "";
        c->gemm = gemm_create((void *)c->stream, CUDA_GEMM_WORKSPACE_BYTES, gerr, sizeof gerr);
        if (!c->gemm) {
            snprintf(err, errlen, "CUDA device %d: gemm_create (bf16 products) failed: %s", device,
                     gerr);
            goto cleanup;
        }
        ctx_mem_add(c, CUDA_GEMM_WORKSPACE_BYTES);
    }
    out->iface = &cuda_iface;
    out->ctx = c;
    return true;

cuda_fail:
    (void)cudaGetLastError();
    snprintf(err, errlen, "CUDA device %d: %s failed: %s", device, step, cudaGetErrorString(e));
    goto cleanup;
blas_fail:
    snprintf(err, errlen, "CUDA device %d: %s failed: %s", device, step,
             cublasGetStatusString(bs));
cleanup:
    if (have_blas) cublasDestroy(c->blas);
    if (c->blas_ws) cudaFree(c->blas_ws);
    if (have_stream) cudaStreamDestroy(c->stream);
    free(c);
    return false;
}
