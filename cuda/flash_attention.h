// flash_attention.h: fused causal attention in bf16 (forward and backward), C interface.
//
// Two paths behind one call: on compute capability 9.0 (Hopper) devices, when the build carries
// the sm_90a kernels, forward and backward run on warpgroup MMA (flash_attention_sm90.cu, head
// sizes up to 128); everything else runs the portable mma.sync kernels (flash_attention.cu).
//
// Tiles of queries against tiles of keys and values in shared memory, online softmax with fp32
// accumulators, bf16 tensor-core products (mma.sync m16n8k16, fp32 accumulate) on register
// fragments. No (T, T) matrix ever reaches device memory: the forward keeps only the log-sum-exp
// of each row for the backward.
//
// Layout: q, k, v (B, T, NH, HS) are the three slices of one (B, T, 3*NH*HS) qkv tensor, so the
// caller passes q = qkv, k = qkv + NH*HS, v = qkv + 2*NH*HS and the row stride qkv_stride =
// 3*NH*HS (any stride works: row t of head h of batch b starts at ptr + (b*T + t)*stride + h*HS).
// out and dout (B, T, NH, HS) use out_stride (NH*HS for a dense tensor); dq, dk, dv use
// qkv_stride, so they can be the slices of a dqkv tensor shaped like qkv.
//
// bf16 pointers are void * here so that C11 code can include this header (C has no bf16 type);
// they point at __nv_bfloat16 (IEEE binary32 truncated to its upper 16 bits, round to nearest
// even), device memory, aligned to 16 bytes, with strides that are multiples of 8 elements.
//
// Causal mask, scale 1/sqrt(HS). HS: a multiple of 8 from 8 to 256 (64, 128 and 256 run at their
// own width, others padded to the next of those); any T >= 1. Calls are stream-ordered on stream
// (a cudaStream_t, NULL for the legacy default stream) and deterministic: no unordered float
// atomics (the Hopper backward adds dq's partial sums in a fixed order), so equal inputs give
// bitwise equal outputs.
//
// Return values: FLASH_OK, FLASH_EBADARG (shape, stride or alignment unsupported; nothing was
// launched), FLASH_ECUDA (a launch failed; cudaGetLastError has been consumed).
#pragma once

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FLASH_OK 0
#define FLASH_EBADARG 1
#define FLASH_ECUDA 2

// Nonzero when the kernels take head size HS.
int flash_attention_supported(int HS);

// Nonzero: use the portable (mma.sync) kernels even where the Hopper ones would run (for tests
// that compare the two paths). Process-wide; not thread-safe.
void flash_attention_force_portable(int on);

// Nonzero (the default, unless the environment sets TPTRAIN_ATTN_WS=0): on Hopper the forward and
// backward use the warp-specialised kernels fed by the tensor memory accelerator where they apply
// (head sizes 64 and 128); zero: the cp.async wgmma kernels (tests and benchmarks compare them).
void flash_attention_set_hopper_ws(int on);

// Nonzero (the default, unless the environment sets TPTRAIN_ATTN_BWD=split): the warp-specialised
// Hopper backward runs as one kernel that adds dq's partial sums up in key-block order; zero: two
// kernels (dq, then dk and dv, each recomputing S and dP), which need less scratch. Benchmarks and
// tests compare them. Set it before sizing the scratch: the fused kernel needs more.
void flash_attention_set_hopper_bwd_fused(int on);

// Nonzero (the default, unless the environment sets TPTRAIN_ATTN_PINGPONG=0): at head size 128 the
// two consumer warpgroups of the warp-specialised Hopper forward take turns at the tensor cores
// (one's softmax under the other's products); zero: they run unsynchronised, as they always do at
// head size 64 (benchmarks and tests compare them).
void flash_attention_set_hopper_pingpong(int on);

// The walk of the persistent warp-specialised Hopper forward over its (head, query tile) items.
// 1 (the environment's TPTRAIN_ATTN_ORDER=pairs): the query tiles of one head in pairs (tile p, then
// tile nqt - 1 - p), so that the blocks running at once share heads and read K and V from L2; 0
// (TPTRAIN_ATTN_ORDER=longest): longest first across heads; -1 (the default): pairs at head size
// 128, longest first at 64, as measured fastest. The same bits either way; benchmarks and tests
// compare them.
void flash_attention_set_hopper_order(int pairs);

// The Q tiles of the warp-specialised Hopper forward: 2 (TPTRAIN_ATTN_Q_STAGES=2), two stages, so
// that a persistent block's next item's Q comes in while the current item runs; 1 (the default),
// one stage, refilled once the current item's last scores are done. The same bits either way;
// tests compare them.
void flash_attention_set_hopper_q_stages(int n);

// The K and V tiles of the one-kernel Hopper backward at head size 64 (at 128 a second stage does
// not fit): 2 (TPTRAIN_ATTN_KV_STAGES=2), two stages, so that a block's next key block comes in
// while the current one runs; 1 (the default), one stage, refilled once the current key block's
// products are done. The same bits either way; tests compare them.
void flash_attention_set_hopper_kv_stages(int n);

// The exponentials of the warp-specialised Hopper forward's softmax at head size 64: nonzero
// (TPTRAIN_ATTN_EXP2=mixed), a quarter of them by a polynomial on the FMA pipe (relative error
// 7.5e-5) and the rest by the multi-function unit, whose 16 per cycle per multiprocessor take as
// long per tile as the tile's products do at that head size; zero (the default, =mufu), all by the
// multi-function unit. Not the same bits; tests compare both with the reference.
void flash_attention_set_hopper_exp2(int mixed);

// The walk of the one-kernel Hopper backward. 1 (TPTRAIN_ATTN_BWD_ORDER=heads): persistent blocks
// hold whole heads at a time (the key blocks of a head in pairs, p with nkb - 1 - p) and walk their
// query tiles from the last one down, so that a head's Q, dO and dq accumulator are shared in L2; 0
// (TPTRAIN_ATTN_BWD_ORDER=longest): the key blocks of different heads, longest first; -1 (the
// default): heads at head size 128 and, at 64, up to T 4096 (longest first beyond), as measured
// fastest. dq has the same bits
// either way (its partials are added in key-block order); dk and dv sum their query tiles in the
// other order. Benchmarks and tests compare them.
void flash_attention_set_hopper_bwd_order(int heads);

// The kernels flash_attention_fwd/bwd run at head size HS on the current device, in words
// ("mma.sync D=128 padded", ...); "unsupported" when they take no such head size.
const char *flash_attention_path(int HS);

// out (B, T, NH, HS) bf16, row stride out_stride = softmax(q k^T * scale, causal) v
// lse (B, NH, T) fp32 = natural log of sum over keys of exp(q . k * scale) of each query row
int flash_attention_fwd(void *stream, void *out, float *lse, const void *q, const void *k,
                        const void *v, int B, int T, int NH, int HS, int qkv_stride,
                        int out_stride);

// Floats of scratch flash_attention_bwd needs: D = rowsum(dout * out), (B, NH, T). dq is
// accumulated per query tile in registers over all key tiles, so it needs no fp32 buffer.
size_t flash_attention_bwd_scratch_floats(int B, int T, int NH, int HS);

// dq, dk, dv (B, T, NH, HS) bf16, row stride qkv_stride, are overwritten with the gradients of
// the loss given dout (B, T, NH, HS) bf16 (row stride out_stride). out and lse are the forward's
// outputs for the same q, k, v. scratch: flash_attention_bwd_scratch_floats() floats of device
// memory, contents undefined on entry and on return.
int flash_attention_bwd(void *stream, void *dq, void *dk, void *dv, const void *dout,
                        const void *q, const void *k, const void *v, const void *out,
                        const float *lse, float *scratch, int B, int T, int NH, int HS,
                        int qkv_stride, int out_stride);

// The same, and where the Hopper one-kernel backward runs (compute capability 9.0, HS 64 or 128,
// aligned operands, the default TPTRAIN_ATTN_BWD), dsum (3 NH HS floats: dq's columns, then dk's,
// dv's) += the column sums of dq, dk and dv as stored, summed as the kernels write the rows and
// added in a fixed order, using sums (flash_attention_bwd_sums_floats floats, contents undefined);
// *summed is then 1. Elsewhere *summed is 0 and dsum untouched: the caller sums them itself.
int flash_attention_bwd_summing(void *stream, void *dq, void *dk, void *dv, const void *dout,
                                const void *q, const void *k, const void *v, const void *out,
                                const float *lse, float *scratch, int B, int T, int NH, int HS,
                                int qkv_stride, int out_stride, float *dsum, float *sums, int *summed);
size_t flash_attention_bwd_sums_floats(int B, int T, int NH, int HS);

#ifdef __cplusplus
}
#endif
