// optim.cu: the reductions and the optimiser: sum, sum of squares (the grad norm, flat and by norm group),
// scale and AdamW.
//
// Part of the CUDA backend: the kernels and their launchers; backend_cuda.cu puts the launchers in
// the backend table. Shared context, checks and device helpers: cuda_internal.cuh.
//
// Traffic of an optimizer step with clipping, per parameter. Clipping scales every gradient by
// min(1, clip / ||g||), so the norm must be complete before the first update is written, and the
// gradients (500 MB at 124M) do not fit on the chip between a norm and an update in one pass. The
// least traffic is therefore two passes: the norm (segments_sumsq: g read, 4 bytes) and one fused
// update (adamw: p, g, m, v read, 16 bytes; p, m, v written, 12; the bf16 compute copy of p
// written, 2) = 34 bytes per parameter in bf16, 32 in fp32, where three separate passes for
// clipping, AdamW and the bf16 copy would move 4 + 8 + 28 + 6 = 46. GPT-2 124M (124.5M local
// parameters at tp=1): 4.23 GB, 0.98 ms at 4.3 TB/s. With split masters (bf16 high half + low half,
// backend.h) the update reads 4 + 12 and writes 4 + 8: 32 bytes in all. Both kernels here are those two passes; the
// norm's partials and the clip factor are a few KB. (A DP reduction that already reads every
// gradient, such as a distributed optimizer's reduce-scatter, could produce the norm on the way
// and leave 30 bytes.)

#include "cuda_internal.cuh"

// -- reductions and optimiser

// partial (gridDim.x) = per-block sums (of squares if squared) in double, grid-stride order
__global__ void reduce_partial_kernel(double *partial, const float *x, size_t n, int squared) {
    __shared__ double sh[TPC_WARP];
    double s = 0.0;
    GRID_STRIDE(i, n) {
        double v = (double)x[i];
        s += squared ? v * v : v;
    }
    s = block_sum_d(s, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// *out = (accumulate ? *out : 0) + sum of partial (nparts); one block
__global__ void reduce_finish_kernel(float *out, const double *partial, int nparts,
                                     int accumulate) {
    __shared__ double sh[TPC_WARP];
    double s = 0.0;
    for (int k = threadIdx.x; k < nparts; k += blockDim.x) s += partial[k];
    s = block_sum_d(s, sh);
    if (threadIdx.x == 0) *out = (float)(accumulate ? (double)*out + s : s);
}

__global__ void scale_kernel(float *x, float s, size_t n) {
    GRID_STRIDE(i, n) x[i] *= s;
}

// Segment-table walks (segments_sumsq, adamw): block b owns elements [b * chunk, (b + 1) * chunk)
// of the flat buffer and visits, in table order, every segment that overlaps them; the table
// passes through shared memory SEG_TILE entries at a time, and every thread takes part in the
// walk (it is block-uniform). An overlap [lo, hi) is cut into a scalar head up to the next
// multiple of 4, 4-element vectors, and a scalar tail, so each element is touched by exactly one
// thread and vector accesses stay aligned when the buffers are.

// The overlap [lo, hi) of segment s with [c0, c1); false if empty.
__device__ __forceinline__ bool seg_overlap(const struct param_segment &s, size_t c0, size_t c1,
                                            size_t *lo, size_t *hi) {
    size_t a = s.offset > c0 ? s.offset : c0;
    size_t e = s.offset + s.numel;
    size_t b = e < c1 ? e : c1;
    *lo = a;
    *hi = b;
    return a < b;
}

// partial (gridDim.x, 2) = per-block sums of x^2 in double, by norm group
template <bool VEC>
__global__ void segments_sumsq_partial_kernel(double *partial, const float *x,
                                              const struct param_segment *segs, int n_segs,
                                              size_t n, size_t chunk) {
    __shared__ struct param_segment tab[SEG_TILE];
    __shared__ double sh[TPC_WARP];
    size_t c0 = (size_t)blockIdx.x * chunk;
    size_t c1 = c0 + chunk < n ? c0 + chunk : n;
    double acc0 = 0.0, acc1 = 0.0; // norm groups 0 and 1
    for (int s0 = 0; s0 < n_segs; s0 += SEG_TILE) {
        int cnt = min(SEG_TILE, n_segs - s0);
        __syncthreads(); // the previous tile is no longer read
        for (int j = threadIdx.x; j < cnt; j += blockDim.x) tab[j] = segs[s0 + j];
        __syncthreads();
        for (int j = 0; j < cnt; j++) {
            size_t lo, hi;
            if (!seg_overlap(tab[j], c0, c1, &lo, &hi)) continue;
            double s = 0.0;
            size_t body = lo, nb = 0;
            if (VEC) {
                body = (lo + 3) & ~(size_t)3;
                if (body > hi) body = hi;
                nb = (hi - body) / 4;
            }
            for (size_t i = lo + threadIdx.x; i < body; i += blockDim.x) {
                double v = x[i];
                s += v * v;
            }
            const float4 *x4 = reinterpret_cast<const float4 *>(x + body);
            for (size_t q = threadIdx.x; q < nb; q += blockDim.x) {
                float4 v = x4[q];
                s += (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
            }
            for (size_t i = body + nb * 4 + threadIdx.x; i < hi; i += blockDim.x) {
                double v = x[i];
                s += v * v;
            }
            if (tab[j].norm_group == 1) acc1 += s;
            else acc0 += s;
        }
    }
    double g0 = block_sum_d(acc0, sh);
    double g1 = block_sum_d(acc1, sh);
    if (threadIdx.x == 0) {
        partial[2 * (size_t)blockIdx.x] = g0;
        partial[2 * (size_t)blockIdx.x + 1] = g1;
    }
}

// out (2) = sums of partial (nparts, 2) by group, parts in a fixed order; one block
__global__ void segments_sumsq_finish_kernel(float *out, const double *partial, int nparts) {
    __shared__ double sh[TPC_WARP];
    for (int g = 0; g < 2; g++) {
        double s = 0.0;
        for (int k = threadIdx.x; k < nparts; k += blockDim.x) s += partial[2 * (size_t)k + g];
        s = block_sum_d(s, sh);
        if (threadIdx.x == 0) out[g] = (float)s;
    }
}

struct adamw_args {
    float lr, beta1, beta2, eps, grad_scale, grad_clip, bc1, bc2; // bc = 1 - beta^t
    const float *norm_sq;                                         // (2) or NULL
};

// One AdamW element, decoupled weight decay; the fp32 expression of the reference, every operation
// rounded as written: the compiler may otherwise fuse a multiply and an add into one rounding
// differently in each place this is inlined (the vector body, the scalar loops, split masters),
// and those must give the same bits.
__device__ __forceinline__ float adamw_elem(float *p, float *m, float *v, float g, float wd,
                                            const struct adamw_args &a) {
    float mi = __fadd_rn(__fmul_rn(a.beta1, *m), __fmul_rn(1.0f - a.beta1, g));
    float vi = __fadd_rn(__fmul_rn(a.beta2, *v), __fmul_rn(__fmul_rn(1.0f - a.beta2, g), g));
    *m = mi;
    *v = vi;
    float mhat = __fdiv_rn(mi, a.bc1), vhat = __fdiv_rn(vi, a.bc2);
    float step = __fadd_rn(__fdiv_rn(mhat, __fadd_rn(__fsqrt_rn(vhat), a.eps)), __fmul_rn(wd, *p));
    *p = __fsub_rn(*p, __fmul_rn(a.lr, step));
    return *p;
}

// Element i, its master in p (and its compute copy in pc, if any) or, with p NULL, split into pc
// (the bf16 high halves) and plo (the low halves): joined, updated, split again.
template <typename E>
__device__ __forceinline__ void adamw_one(float *p, E *pc, uint16_t *plo, size_t i, float *m, float *v, float g,
                                          float wd, const struct adamw_args &a) {
    if (p) {
        float pi = adamw_elem(p + i, m + i, v + i, g, wd, a);
        if (pc) pc[i] = from_f<E>(pi);
        return;
    }
    if constexpr (sizeof(E) == 2) {
        float x = __uint_as_float(tp_split_join(__bfloat16_as_ushort(pc[i]), plo[i]));
        adamw_elem(&x, m + i, v + i, g, wd, a);
        uint32_t bits = __float_as_uint(x);
        pc[i] = __ushort_as_bfloat16(tp_split_hi(bits));
        plo[i] = tp_split_lo(bits);
    }
}

// Four masters from element i on, as fp32: from p, or joined from the split halves pc and plo.
template <typename E, bool SPLIT>
__device__ __forceinline__ vec_t<float, 4> adamw_load_masters(const float *p, const E *pc, const uint16_t *plo,
                                                              size_t i) {
    if constexpr (SPLIT) {
        vec_t<float, 4> r;
        vec_t<E, 4> hi = ld_vec<E, 4>(pc + i);
        vec_t<uint16_t, 4> lo = ld_vec<uint16_t, 4>(plo + i);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            r.e[e] = __uint_as_float(tp_split_join(__bfloat16_as_ushort(hi.e[e]), lo.e[e]));
        }
        return r;
    } else {
        return ld_vec<float, 4>(p + i);
    }
}

// Stores four updated masters from element i on: p and its compute copy pc (if any), or split into
// pc (high halves) and plo.
template <typename E, bool SPLIT>
__device__ __forceinline__ void adamw_store_masters(float *p, E *pc, uint16_t *plo, size_t i,
                                                    const vec_t<float, 4> &x) {
    vec_t<E, 4> cv;
    if constexpr (SPLIT) {
        vec_t<uint16_t, 4> lo;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            uint32_t bits = __float_as_uint(x.e[e]);
            cv.e[e] = __ushort_as_bfloat16(tp_split_hi(bits));
            lo.e[e] = tp_split_lo(bits);
        }
        st_vec<E, 4>(pc + i, cv);
        st_vec<uint16_t, 4>(plo + i, lo);
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++) cv.e[e] = from_f<E>(x.e[e]);
        st_vec<float, 4>(p + i, x);
        if (pc) st_vec<E, 4>(pc + i, cv);
    }
}

// p, g, m, v (n) fp32, pc (n) E or NULL, plo (n) or NULL (SPLIT: split masters, p NULL); one launch
// over every segment (see the walk above), one wave of blocks (see adamw_launch). g is scaled by
// grad_scale, times min(1, grad_clip / ||g * grad_scale||) when norm_sq is given. The vector body
// keeps ADAMW_UNROLL groups of the four loads in flight per thread: the stores may alias the next
// loads as far as the compiler knows, so it would not move those above them by itself. Every
// element is computed alone, by the same expression, whatever the grouping or the chunk it falls in.
#define ADAMW_UNROLL 2
template <typename E, bool VEC, bool SPLIT>
__global__ void adamw_kernel(float *p, E *pc, uint16_t *plo, const float *g, float *m, float *v,
                             const struct param_segment *segs, int n_segs, size_t n, size_t chunk,
                             struct adamw_args a) {
    __shared__ struct param_segment tab[SEG_TILE];
    float gs = a.grad_scale;
    if (a.norm_sq && a.grad_clip > 0.0f) {
        float norm = sqrtf(a.norm_sq[0] + a.norm_sq[1]);
        if (norm > a.grad_clip) gs = a.grad_scale * (a.grad_clip / norm);
    }
    size_t c0 = (size_t)blockIdx.x * chunk;
    size_t c1 = c0 + chunk < n ? c0 + chunk : n;
    for (int s0 = 0; s0 < n_segs; s0 += SEG_TILE) {
        int cnt = min(SEG_TILE, n_segs - s0);
        __syncthreads();
        for (int j = threadIdx.x; j < cnt; j += blockDim.x) tab[j] = segs[s0 + j];
        __syncthreads();
        for (int j = 0; j < cnt; j++) {
            size_t lo, hi;
            if (!seg_overlap(tab[j], c0, c1, &lo, &hi)) continue;
            float wd = tab[j].weight_decay;
            size_t body = lo, nb = 0;
            if (VEC) {
                body = (lo + 3) & ~(size_t)3;
                if (body > hi) body = hi;
                nb = (hi - body) / 4;
            }
            for (size_t i = lo + threadIdx.x; i < body; i += blockDim.x) {
                adamw_one<E>(p, pc, plo, i, m, v, g[i] * gs, wd, a);
            }
            for (size_t q0 = threadIdx.x; q0 < nb; q0 += ADAMW_UNROLL * (size_t)blockDim.x) {
                vec_t<float, 4> pv[ADAMW_UNROLL] = {}, gv[ADAMW_UNROLL] = {};
                vec_t<float, 4> mv[ADAMW_UNROLL] = {}, vv[ADAMW_UNROLL] = {};
#pragma unroll
                for (int u = 0; u < ADAMW_UNROLL; u++) {
                    size_t q = q0 + (size_t)u * blockDim.x;
                    if (q >= nb) break;
                    size_t i = body + 4 * q;
                    pv[u] = adamw_load_masters<E, SPLIT>(p, pc, plo, i);
                    gv[u] = ld_vec<float, 4>(g + i);
                    mv[u] = ld_vec<float, 4>(m + i);
                    vv[u] = ld_vec<float, 4>(v + i);
                }
#pragma unroll
                for (int u = 0; u < ADAMW_UNROLL; u++) {
                    size_t q = q0 + (size_t)u * blockDim.x;
                    if (q >= nb) break;
                    size_t i = body + 4 * q;
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        adamw_elem(&pv[u].e[e], &mv[u].e[e], &vv[u].e[e], gv[u].e[e] * gs, wd, a);
                    adamw_store_masters<E, SPLIT>(p, pc, plo, i, pv[u]);
                    st_vec<float, 4>(m + i, mv[u]);
                    st_vec<float, 4>(v + i, vv[u]);
                }
            }
            for (size_t i = body + nb * 4 + threadIdx.x; i < hi; i += blockDim.x) {
                adamw_one<E>(p, pc, plo, i, m, v, g[i] * gs, wd, a);
            }
        }
    }
}


// -- reductions and elementwise helpers

static void reduce_launch(struct cuda_ctx *c, float *out, const float *x, size_t n, int squared,
                          int accumulate) {
    unsigned int nb = tpc_blocks(n, (size_t)TPC_BLOCK * 4);
    if (nb > REDUCE_MAX_BLOCKS) nb = REDUCE_MAX_BLOCKS;
    double *part = (double *)ctx_scratch(c, (size_t)nb * sizeof(double)); // (nb)
    reduce_partial_kernel<<<nb, TPC_BLOCK, 0, c->stream>>>(part, x, n, squared);
    CUDA_CHECK_LAUNCH("reduce_partial_kernel");
    reduce_finish_kernel<<<1, TPC_BLOCK, 0, c->stream>>>(out, part, (int)nb, accumulate);
    CUDA_CHECK_LAUNCH("reduce_finish_kernel");
}

void cuda_sum(void *ctx, float *out, const float *x, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) {
        CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(float), c->stream));
        return;
    }
    reduce_launch(c, out, x, n, 0, 0);
}

void cuda_sumsq_acc(void *ctx, float *out, const float *x, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) return;
    reduce_launch(c, out, x, n, 1, 1);
}

// Chunk of the flat buffer per block in the segment walks: a multiple of 8, so chunk boundaries
// keep 16-byte alignment for fp32 and bf16 alike; depends on n only.
static size_t seg_chunk(size_t n) {
    size_t per = ceil_div(n, SEG_MAX_BLOCKS);
    if (per < SEG_MIN_CHUNK) per = SEG_MIN_CHUNK;
    return tp_round_up(per, 8);
}

void cuda_segments_sumsq(void *ctx, float *out, const float *x,
                         const struct param_segment *segs, int n_segs, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0 || n_segs <= 0) {
        CUDA_CHECK(cudaMemsetAsync(out, 0, 2 * sizeof(float), c->stream));
        return;
    }
    size_t chunk = seg_chunk(n);
    unsigned int nb = (unsigned int)ceil_div(n, chunk);
    double *part = (double *)ctx_scratch(c, 2 * (size_t)nb * sizeof(double)); // (nb, 2)
    if (aligned_to(x, 16))
        segments_sumsq_partial_kernel<true><<<nb, TPC_BLOCK, 0, c->stream>>>(part, x, segs, n_segs,
                                                                             n, chunk);
    else
        segments_sumsq_partial_kernel<false><<<nb, TPC_BLOCK, 0, c->stream>>>(part, x, segs,
                                                                              n_segs, n, chunk);
    CUDA_CHECK_LAUNCH("segments_sumsq_partial_kernel");
    segments_sumsq_finish_kernel<<<1, TPC_BLOCK, 0, c->stream>>>(out, part, (int)nb);
    CUDA_CHECK_LAUNCH("segments_sumsq_finish_kernel");
}

void cuda_scale(void *ctx, float *x, float s, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) return;
    scale_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(x, s, n);
    CUDA_CHECK_LAUNCH("scale_kernel");
}

// Blocks of `kernel` (TPC_BLOCK threads) the device holds at once.
static int resident_blocks(const struct cuda_ctx *c, const void *kernel) {
    int per_sm = 0, sms = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, TPC_BLOCK, 0));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c->device));
    return per_sm * sms > 0 ? per_sm * sms : 1;
}

// AdamW runs as one wave: as many chunks as the device holds blocks at once (each at least
// ADAMW_MIN_CHUNK elements, a multiple of 8 so chunk starts keep 16-byte alignment), so that all
// finish together instead of a last, partly filled wave streaming alone (2048 fixed chunks were
// 3 to 4 waves at 124M). The partition changes no result: elements are independent.
#define ADAMW_MIN_CHUNK 4096
template <typename E, bool VEC, bool SPLIT>
static void adamw_launch_as(struct cuda_ctx *c, const struct adamw_step *s, E *pc, const struct adamw_args &a) {
    const void *kernel = (const void *)adamw_kernel<E, VEC, SPLIT>;
    size_t chunk = tp_round_up(ceil_div(s->n, (size_t)resident_blocks(c, kernel)), 8);
    if (chunk < ADAMW_MIN_CHUNK) chunk = ADAMW_MIN_CHUNK;
    unsigned int nb = (unsigned int)ceil_div(s->n, chunk);
    adamw_kernel<E, VEC, SPLIT><<<nb, TPC_BLOCK, 0, c->stream>>>(s->p, pc, s->p_lo, s->g, s->m, s->v, s->segs,
                                                                s->n_segs, s->n, chunk, a);
    CUDA_CHECK_LAUNCH("adamw_kernel");
}

// The vector body needs every buffer aligned to its 4-element access (split masters: only 2-byte
// elements, so only where E is; fp32 compute copies are never split).
template <typename E>
static void adamw_launch(struct cuda_ctx *c, const struct adamw_step *s, E *pc,
                         const struct adamw_args &a) {
    bool common = aligned_to(s->g, 16) && aligned_to(s->m, 16) && aligned_to(s->v, 16);
    if constexpr (sizeof(E) == 2) {
        if (!s->p) {
            if (common && aligned_to(pc, 8) && aligned_to(s->p_lo, 8)) adamw_launch_as<E, true, true>(c, s, pc, a);
            else adamw_launch_as<E, false, true>(c, s, pc, a);
            return;
        }
    }
    bool vec = s->p && common && aligned_to(s->p, 16) && aligned_to(pc, 4 * sizeof(E));
    if (vec) adamw_launch_as<E, true, false>(c, s, pc, a);
    else adamw_launch_as<E, false, false>(c, s, pc, a);
}

void cuda_adamw(void *ctx, const struct adamw_step *s) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (s->n == 0 || s->n_segs <= 0) return;
    struct adamw_args a;
    a.lr = s->lr;
    a.beta1 = s->beta1;
    a.beta2 = s->beta2;
    a.eps = s->eps;
    a.grad_scale = s->grad_scale;
    a.grad_clip = s->grad_clip;
    a.norm_sq = s->norm_sq;
    // bias corrections in double on the host: pow(beta, t) of a float loses digits at large t
    a.bc1 = (float)(1.0 - pow((double)s->beta1, (double)s->t));
    a.bc2 = (float)(1.0 - pow((double)s->beta2, (double)s->t));
    if (is_bf16(c)) adamw_launch(c, s, (bf16 *)s->p_compute, a);
    else adamw_launch(c, s, (float *)s->p_compute, a);
}

// A kernel of this library, for backend creation to check that an image for the device exists.
const void *cuda_probe_kernel(void) { return (const void *)scale_kernel; }
