// embedding.cu: the vocab-parallel token embedding and the position embedding, forward and backward.
//
// Part of the CUDA backend: the kernels and their launchers; backend_cuda.cu puts the launchers in
// the backend table. Shared context, checks and device helpers: cuda_internal.cuh.

#include "cuda_internal.cuh"

// -- embeddings

// out (N, C) = wte rows of the tokens in this shard, 0 for the others; V divides C
template <typename E, int V>
__global__ void vocab_embedding_fwd_kernel(E *out, const int *tokens, const E *wte, int N, int C,
                                           int vocab_start, int n_vocab) {
    size_t cv = (size_t)C / V; // vectors per row
    GRID_STRIDE(k, (size_t)N * cv) {
        size_t i = k / cv, c = (k % cv) * V;
        int r = tokens[i] - vocab_start;
        vec_t<E, V> v;
        if (r >= 0 && r < n_vocab) {
            v = ld_vec<E, V>(wte + (size_t)r * C + c);
        } else {
#pragma unroll
            for (int e = 0; e < V; e++) v.e[e] = from_f<E>(0.0f);
        }
        st_vec<E, V>(out + i * C + c, v);
    }
}

// The ordered compaction both backward kernels list a block's kept tokens with: each thread has
// flagged up to 8 consecutive tokens (mine), and a scan over its warp, then over the warps, places
// them after the `kept` listed so far, in token order. Returns the thread's first slot and sets
// *total to the new count (the same in every thread). Every thread of the block calls it (it
// synchronises once); warp_n (one int per warp, shared) is rewritten by the next call, so the
// caller synchronises again before that.
__device__ __forceinline__ int emb_list_slot(unsigned mine, int kept, int *warp_n, int *total) {
    const int lane = threadIdx.x % TPC_WARP, warp = threadIdx.x / TPC_WARP;
    const int nwarps = blockDim.x / TPC_WARP;
    int n = __popc(mine), incl = n; // inclusive scan of the counts over the warp
#pragma unroll
    for (int o = 1; o < TPC_WARP; o <<= 1) {
        int t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
    }
    if (lane == TPC_WARP - 1) warp_n[warp] = incl;
    __syncthreads();
    int pos = kept + incl - n, sum = kept;
    for (int w = 0; w < nwarps; w++) {
        if (w < warp) pos += warp_n[w];
        sum += warp_n[w];
    }
    *total = sum;
    return pos;
}

// grid (EMB_BWD_GROUPS, ceil(C / (blockDim * V))). Block (g, cy) owns V channels per thread of
// every vocab row r with r % EMB_BWD_GROUPS == g. Per tile of tokens it first lists, in token
// order, the tokens whose row is in its group (an ordered compaction: each thread flags 8
// consecutive tokens, a scan over the warps places them), then sorts that list by row, stably
// (each entry's rank counted against the others; skipped above EMB_BWD_SORT_MAX entries, where the
// token order is kept), and walks it. Each dwte element is updated by exactly one thread, and a
// row's tokens are added in token order either way, so no atomics are needed and the result is the
// same sum, in the same order, as a sequential loop over tokens. The sort makes a row's tokens of
// a tile one run: one load and one store of dwte per run, and the run's dout rows loaded
// EMB_BWD_UNROLL at a time. (Walked in token order the runs were a token or two long and each
// waited on its dwte load: 0.34 ms at GPT-2 124M, B 16 on the H200, where the most frequent
// token's group chained about a thousand memory round trips.)
template <typename E, int V>
__global__ void __launch_bounds__(EMB_BWD_THREADS)
vocab_embedding_bwd_kernel(float *dwte, const E *__restrict__ dout, const int *tokens, int N, int C,
                           int vocab_start, int n_vocab) {
    __shared__ int rows[EMB_BWD_TILE]; // vocab row of each kept token, in token order
    __shared__ int toks[EMB_BWD_TILE]; // its position (row of dout)
    __shared__ int srows[EMB_BWD_TILE], stoks[EMB_BWD_TILE]; // the same, sorted by row (stable)
    __shared__ int warp_n[EMB_BWD_THREADS / TPC_WARP];
    const int g = blockIdx.x;
    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * V; // first channel of this thread
    for (int i0 = 0; i0 < N; i0 += EMB_BWD_TILE) {
        int cnt = min(EMB_BWD_TILE, N - i0);
        int kept = 0; // block-uniform
        for (int j0 = 0; j0 < cnt; j0 += 8 * blockDim.x) {
            int jt = j0 + 8 * threadIdx.x; // this thread's 8 consecutive tokens
            int r8[8];
            unsigned mine = 0;
#pragma unroll
            for (int u = 0; u < 8; u++) {
                int r = jt + u < cnt ? tokens[i0 + jt + u] - vocab_start : -1;
                r8[u] = r;
                if (r >= 0 && r < n_vocab && (r & (EMB_BWD_GROUPS - 1)) == g) mine |= 1u << u;
            }
            int total, pos = emb_list_slot(mine, kept, warp_n, &total);
#pragma unroll
            for (int u = 0; u < 8; u++)
                if (mine >> u & 1u) {
                    rows[pos] = r8[u];
                    toks[pos] = i0 + jt + u;
                    pos++;
                }
            kept = total;
            __syncthreads(); // warp_n is rewritten next round; the list is complete after the last
        }
        const int *lr = rows, *lt = toks;
        if (kept > 1 && kept <= EMB_BWD_SORT_MAX) {
            for (int k = threadIdx.x; k < kept; k += blockDim.x) {
                int rk = rows[k], rank = 0;
                for (int q = 0; q < kept; q++) {
                    int rq = rows[q];
                    rank += rq < rk || (rq == rk && q < k);
                }
                srows[rank] = rk;
                stoks[rank] = toks[k];
            }
            __syncthreads();
            lr = srows;
            lt = stoks;
        }
        if (c < C && kept > 0) {
            int k = 0, r = lr[0];
            vec_t<float, V> acc = ld_vec<float, V>(dwte + (size_t)r * C + c);
            while (k < kept) {
                int end = k + 1; // the run of row r is [k, end)
                while (end < kept && lr[end] == r) end++;
                // The next run's row differs from r, and any earlier store to it has been
                // issued: its load can be in flight while this run adds up.
                int rn = end < kept ? lr[end] : -1;
                vec_t<float, V> next = {};
                if (rn >= 0) next = ld_vec<float, V>(dwte + (size_t)rn * C + c);
                for (; k < end; k += EMB_BWD_UNROLL) {
                    vec_t<E, V> d[EMB_BWD_UNROLL];
#pragma unroll
                    for (int u = 0; u < EMB_BWD_UNROLL; u++)
                        if (k + u < end) d[u] = ld_vec<E, V>(dout + (size_t)lt[k + u] * C + c);
#pragma unroll
                    for (int u = 0; u < EMB_BWD_UNROLL; u++)
                        if (k + u < end) {
#pragma unroll
                            for (int e = 0; e < V; e++) acc.e[e] += to_f(d[u].e[e]);
                        }
                }
                k = end;
                st_vec<float, V>(dwte + (size_t)r * C + c, acc);
                r = rn;
                acc = next;
            }
        }
        __syncthreads(); // the lists are rewritten by the next tile
    }
}

// The same sums with fewer round trips on the critical path (TPTRAIN_EMB_BWD=sorted). Grid
// (EMB_BWD2_GROUPS, ceil(C / (blockDim * V))): four times the groups, so a block walks a quarter of
// the rows; its kept tokens are collected over as many tiles of the tokens as fit (EMB_BWD2_CAP
// entries) before they are sorted and walked, so that each row's dwte is read and written once per
// EMB_BWD2_CAP kept tokens rather than once per tile of 1024 tokens; the sort is a bitonic sort of
// (row, list position) keys, which keeps token order within a row and takes log^2 steps instead of
// the quadratic ranking; and a run's dout rows come EMB_BWD2_UNROLL at a time with the next chunk's
// loads issued before the current chunk is added, so that a frequent token's run (hundreds of
// rows at GPT-2 scale) waits on memory half as often. A row's tokens are still added one at a
// time in token order, so dwte gets the same bits as from vocab_embedding_bwd_kernel, and as from
// a sequential loop.
template <typename E, int V>
__device__ __forceinline__ void emb_bwd_chunk(vec_t<E, V> (&d)[EMB_BWD2_UNROLL], const E *dout,
                                              const int *toks, const unsigned *keys, int k, int end,
                                              int C, int c) {
#pragma unroll
    for (int u = 0; u < EMB_BWD2_UNROLL; u++)
        if (k + u < end)
            d[u] = ld_vec<E, V>(dout + (size_t)toks[keys[k + u] & (EMB_BWD2_CAP - 1)] * C + c);
}

template <typename E, int V>
__global__ void __launch_bounds__(EMB_BWD2_THREADS)
vocab_embedding_bwd_sorted_kernel(float *dwte, const E *__restrict__ dout, const int *tokens, int N,
                                  int C, int vocab_start, int n_vocab) {
    constexpr int GSHIFT = __builtin_ctz(EMB_BWD2_GROUPS), KSHIFT = __builtin_ctz(EMB_BWD2_CAP);
    static_assert((EMB_BWD2_GROUPS & (EMB_BWD2_GROUPS - 1)) == 0 && (EMB_BWD2_CAP & (EMB_BWD2_CAP - 1)) == 0,
                  "powers of two");
    static_assert(EMB_BWD2_CAP >= 8 * EMB_BWD2_THREADS, "a round of tokens must fit");
    // keys[k] = (row >> GSHIFT) << KSHIFT | k for the k-th kept token, toks[k] its position
    __shared__ unsigned keys[EMB_BWD2_CAP];
    __shared__ int toks[EMB_BWD2_CAP];
    __shared__ int warp_n[EMB_BWD2_THREADS / TPC_WARP];
    const int g = blockIdx.x;
    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * V; // first channel of this thread
    const int round = 8 * blockDim.x;                          // tokens a round looks at
    int kept = 0;                                               // block-uniform
    for (int i0 = 0; i0 < N; i0 += round) {
        // this round's kept tokens appended in token order (as vocab_embedding_bwd_kernel lists them)
        int jt = i0 + 8 * threadIdx.x;
        int r8[8];
        if (jt + 8 <= N && ((uintptr_t)tokens & 15) == 0) { // every block reads every token: 32 bytes at once
            const int4 v[2] = {*reinterpret_cast<const int4 *>(tokens + jt),
                               *reinterpret_cast<const int4 *>(tokens + jt + 4)};
#pragma unroll
            for (int u = 0; u < 8; u++) r8[u] = reinterpret_cast<const int *>(v)[u];
        } else {
#pragma unroll
            for (int u = 0; u < 8; u++) r8[u] = jt + u < N ? tokens[jt + u] : vocab_start - 1;
        }
        unsigned mine = 0;
#pragma unroll
        for (int u = 0; u < 8; u++) {
            int r = r8[u] - vocab_start;
            r8[u] = r;
            if (r >= 0 && r < n_vocab && (r & (EMB_BWD2_GROUPS - 1)) == g) mine |= 1u << u;
        }
        int total, pos = emb_list_slot(mine, kept, warp_n, &total);
#pragma unroll
        for (int u = 0; u < 8; u++)
            if (mine >> u & 1u) {
                keys[pos] = (unsigned)(r8[u] >> GSHIFT) << KSHIFT | (unsigned)pos;
                toks[pos] = jt + u;
                pos++;
            }
        kept = total;
        __syncthreads(); // warp_n is rewritten next round; the list is complete
        bool last = i0 + round >= N;
        if (!last && kept + round <= EMB_BWD2_CAP) continue; // the next round fits: keep collecting
        if (kept == 0) continue;

        // sort keys[0, kept) ascending: row, then list position (= token order)
        int P = 2;
        while (P < kept) P <<= 1;
        for (int k = kept + (int)threadIdx.x; k < P; k += blockDim.x) keys[k] = 0xffffffffu;
        __syncthreads();
        for (int size = 2; size <= P; size <<= 1)
            for (int stride = size >> 1; stride > 0; stride >>= 1) {
                for (int t = threadIdx.x; t < P / 2; t += blockDim.x) {
                    int i = 2 * t - (t & (stride - 1)), j = i + stride; // i has bit `stride` clear
                    unsigned a = keys[i], b = keys[j];
                    if ((a > b) == ((i & size) == 0)) {
                        keys[i] = b;
                        keys[j] = a;
                    }
                }
                __syncthreads();
            }

        // walk the runs of one row: load its dwte, add its tokens' dout rows in order, store
        if (c < C) {
            int k = 0;
            unsigned rk = keys[0] >> KSHIFT; // the run's row, >> GSHIFT
            vec_t<float, V> acc = ld_vec<float, V>(dwte + (size_t)(rk << GSHIFT | (unsigned)g) * C + c);
            while (k < kept) {
                int end = k + 1;
                while (end < kept && keys[end] >> KSHIFT == rk) end++;
                // the next run's row differs, and any earlier store to it has been issued
                unsigned rn = end < kept ? keys[end] >> KSHIFT : 0xffffffffu;
                vec_t<float, V> next = {};
                if (end < kept) next = ld_vec<float, V>(dwte + (size_t)(rn << GSHIFT | (unsigned)g) * C + c);
                vec_t<E, V> d[EMB_BWD2_UNROLL];
                emb_bwd_chunk<E, V>(d, dout, toks, keys, k, end, C, c);
                for (; k < end; k += EMB_BWD2_UNROLL) {
                    vec_t<E, V> dn[EMB_BWD2_UNROLL];
                    if (k + EMB_BWD2_UNROLL < end)
                        emb_bwd_chunk<E, V>(dn, dout, toks, keys, k + EMB_BWD2_UNROLL, end, C, c);
#pragma unroll
                    for (int u = 0; u < EMB_BWD2_UNROLL; u++)
                        if (k + u < end) {
#pragma unroll
                            for (int e = 0; e < V; e++) acc.e[e] += to_f(d[u].e[e]);
                        }
#pragma unroll
                    for (int u = 0; u < EMB_BWD2_UNROLL; u++) d[u] = dn[u];
                }
                k = end;
                st_vec<float, V>(dwte + (size_t)(rk << GSHIFT | (unsigned)g) * C + c, acc);
                rk = rn;
                acc = next;
            }
        }
        kept = 0;
        __syncthreads(); // the list is rewritten by the next round
    }
}

// x (B, T, C) += wpe (T, C) broadcast over B; V divides T*C
template <typename E, int V>
__global__ void position_embedding_fwd_kernel(E *x, const E *wpe, int B, int T, int C) {
    size_t TC = (size_t)T * C;
    GRID_STRIDE(k, (size_t)B * TC / V) {
        size_t i = k * V;
        vec_t<E, V> a = ld_vec<E, V>(x + i);
        vec_t<E, V> p = ld_vec<E, V>(wpe + i % TC);
#pragma unroll
        for (int e = 0; e < V; e++) a.e[e] = from_f<E>(to_f(a.e[e]) + to_f(p.e[e]));
        st_vec<E, V>(x + i, a);
    }
}

// One thread per V consecutive (t, c), summing over b in order; V divides T*C.
template <typename E, int V>
__global__ void position_embedding_bwd_kernel(float *dwpe, const E *dout, int B, int T, int C) {
    size_t TC = (size_t)T * C;
    GRID_STRIDE(k, TC / V) {
        size_t tc = k * V;
        vec_t<float, V> acc = ld_vec<float, V>(dwpe + tc);
        for (int b = 0; b < B; b++) {
            vec_t<E, V> d = ld_vec<E, V>(dout + (size_t)b * TC + tc);
#pragma unroll
            for (int e = 0; e < V; e++) acc.e[e] += to_f(d.e[e]);
        }
        st_vec<float, V>(dwpe + tc, acc);
    }
}

// -- embeddings

template <typename E>
static void vocab_embedding_fwd_impl(struct cuda_ctx *c, E *out, const int *tokens, const E *wte,
                                     int N, int C, int vocab_start, int n_vocab) {
    const int V = vec16<E>::n;
    size_t n = (size_t)N * C;
    if (C % V == 0 && aligned_to(out, 16) && aligned_to(wte, 16))
        vocab_embedding_fwd_kernel<E, V><<<ew_blocks(n / V), TPC_BLOCK, 0, c->stream>>>(
            out, tokens, wte, N, C, vocab_start, n_vocab);
    else
        vocab_embedding_fwd_kernel<E, 1><<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(
            out, tokens, wte, N, C, vocab_start, n_vocab);
    CUDA_CHECK_LAUNCH("vocab_embedding_fwd_kernel");
}

void cuda_vocab_embedding_fwd(void *ctx, void *out, const int *tokens, const void *wte,
                              int N, int C, int vocab_start, int n_vocab) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || C <= 0) return;
    if (is_bf16(c))
        vocab_embedding_fwd_impl(c, (bf16 *)out, tokens, (const bf16 *)wte, N, C, vocab_start, n_vocab);
    else
        vocab_embedding_fwd_impl(c, (float *)out, tokens, (const float *)wte, N, C, vocab_start, n_vocab);
}

template <typename E>
static void vocab_embedding_bwd_impl(struct cuda_ctx *c, float *dwte, const E *dout,
                                     const int *tokens, int N, int C, int vocab_start,
                                     int n_vocab) {
    // 4 channels per thread: one 16-byte dwte access, 8 or 16 bytes of dout
    const int V = 4;
    bool vec = C % V == 0 && aligned_to(dwte, 16) && aligned_to(dout, V * sizeof(E));
    if (c->emb_bwd_sorted) {
        dim3 grid(EMB_BWD2_GROUPS, tpc_blocks((size_t)C, (size_t)EMB_BWD2_THREADS * (vec ? V : 1)));
        if (vec)
            vocab_embedding_bwd_sorted_kernel<E, V><<<grid, EMB_BWD2_THREADS, 0, c->stream>>>(
                dwte, dout, tokens, N, C, vocab_start, n_vocab);
        else
            vocab_embedding_bwd_sorted_kernel<E, 1><<<grid, EMB_BWD2_THREADS, 0, c->stream>>>(
                dwte, dout, tokens, N, C, vocab_start, n_vocab);
        CUDA_CHECK_LAUNCH("vocab_embedding_bwd_sorted_kernel");
        return;
    }
    int per_block = EMB_BWD_THREADS * (vec ? V : 1);
    dim3 grid(EMB_BWD_GROUPS, tpc_blocks((size_t)C, (size_t)per_block));
    if (vec)
        vocab_embedding_bwd_kernel<E, V><<<grid, EMB_BWD_THREADS, 0, c->stream>>>(
            dwte, dout, tokens, N, C, vocab_start, n_vocab);
    else
        vocab_embedding_bwd_kernel<E, 1><<<grid, EMB_BWD_THREADS, 0, c->stream>>>(
            dwte, dout, tokens, N, C, vocab_start, n_vocab);
    CUDA_CHECK_LAUNCH("vocab_embedding_bwd_kernel");
}

void cuda_vocab_embedding_bwd(void *ctx, float *dwte, const void *dout, const int *tokens,
                              int N, int C, int vocab_start, int n_vocab) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || C <= 0 || n_vocab <= 0) return;
    if (is_bf16(c))
        vocab_embedding_bwd_impl(c, dwte, (const bf16 *)dout, tokens, N, C, vocab_start, n_vocab);
    else
        vocab_embedding_bwd_impl(c, dwte, (const float *)dout, tokens, N, C, vocab_start, n_vocab);
}

template <typename E>
static void position_embedding_fwd_impl(struct cuda_ctx *c, E *x, const E *wpe, int B, int T,
                                        int C) {
    const int V = vec16<E>::n;
    size_t n = (size_t)B * T * C;
    if (((size_t)T * C) % V == 0 && aligned_to(x, 16) && aligned_to(wpe, 16))
        position_embedding_fwd_kernel<E, V><<<ew_blocks(n / V), TPC_BLOCK, 0, c->stream>>>(x, wpe, B, T, C);
    else
        position_embedding_fwd_kernel<E, 1><<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(x, wpe, B, T, C);
    CUDA_CHECK_LAUNCH("position_embedding_fwd_kernel");
}

void cuda_position_embedding_fwd(void *ctx, void *x, const void *wpe, int B, int T, int C) {
    struct cuda_ctx *c = ctx_of(ctx);
    if ((size_t)B * T * C == 0 || B <= 0) return;
    if (is_bf16(c)) position_embedding_fwd_impl(c, (bf16 *)x, (const bf16 *)wpe, B, T, C);
    else position_embedding_fwd_impl(c, (float *)x, (const float *)wpe, B, T, C);
}

template <typename E>
static void position_embedding_bwd_impl(struct cuda_ctx *c, float *dwpe, const E *dout, int B,
                                        int T, int C) {
    const int V = 4; // one 16-byte dwpe access; 8 or 16 bytes of dout
    size_t n = (size_t)T * C;
    if (n % V == 0 && aligned_to(dwpe, 16) && aligned_to(dout, V * sizeof(E)))
        position_embedding_bwd_kernel<E, V><<<ew_blocks(n / V), TPC_BLOCK, 0, c->stream>>>(dwpe, dout, B, T, C);
    else
        position_embedding_bwd_kernel<E, 1><<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(dwpe, dout, B, T, C);
    CUDA_CHECK_LAUNCH("position_embedding_bwd_kernel");
}

void cuda_position_embedding_bwd(void *ctx, float *dwpe, const void *dout, int B, int T,
                                 int C) {
    struct cuda_ctx *c = ctx_of(ctx);
    if ((size_t)T * C == 0 || B <= 0) return;
    if (is_bf16(c)) position_embedding_bwd_impl(c, dwpe, (const bf16 *)dout, B, T, C);
    else position_embedding_bwd_impl(c, dwpe, (const float *)dout, B, T, C);
}
